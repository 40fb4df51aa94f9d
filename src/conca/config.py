"""Options as dataclasses, filled from defaults < a YAML/TOML config file < command-line flags.

Each command's options are one dataclass; its fields become `--flags` (help text from the
field's metadata), so a config file and the flags always name the same things, and the
effective config written next to every output can be fed back with `--config`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tomllib
import types
import typing
from pathlib import Path

import yaml

from conca.errors import ConfigError, InputError
from conca.values import describe_range, validate_fields


def option(default, help: str, **kwargs):
    """A dataclass field that carries its --help text and, optionally, its valid values, checked by
    `build_options` for every command: min=/max= (inclusive), gt=/lt= (exclusive), choices=(...),
    path="out_dir" / "out_file" for outputs that must be creatable and writable, and listed=True for
    a comma-separated list (a str field that a config file may also give as a YAML/TOML list)."""
    return dataclasses.field(default=default, metadata={"help": help, **kwargs})


def join_list(value, name: str):
    """A list-valued option as its comma-separated text: a YAML/TOML list (`sites: [final, resid.15]`,
    `seeds: [0, 1, 2]`) becomes "final,resid.15" / "0,1,2", exactly what the flag takes; any other
    value is returned as it is (the type check that follows judges it). Items are text or numbers."""
    if not isinstance(value, (list, tuple)):
        return value
    items = []
    for i, item in enumerate(value):
        if isinstance(item, bool) or not isinstance(item, (str, int, float)):
            raise ConfigError(f"{name}[{i}] must be text or a number, got {item!r}")
        items.append(str(item).strip())
    return ",".join(items)


def _base_type(tp):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0]
    return tp


def add_options(parser: argparse.ArgumentParser, cls: type) -> None:
    """One --flag per dataclass field; flags the user does not give stay out of the namespace."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = _base_type(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else None
        help_text = f.metadata.get("help", "")
        notes = [f"default: {default}" if default not in (None, "") else "", describe_range(f.metadata)]
        help_text += f" ({'; '.join(n for n in notes if n)})" if any(notes) else ""
        kwargs = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        # Values stay text here: build_options converts and checks them, the same way as a config
        # file's, so every bad value gets the same one-line error.
        kwargs.update(type=str, metavar="BOOL" if tp is bool else f.name.upper())
        parser.add_argument(flag, **kwargs)
    parser.add_argument("--config", dest="_config", default=argparse.SUPPRESS, metavar="FILE",
                        help="YAML or TOML file of options (keys as the flags, with _ or -); flags given here override it")


def read_config_file(path: "str | Path") -> dict:
    path = Path(path)
    if not path.exists():
        raise InputError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text") from None
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml", ".json"):
            data = yaml.safe_load(text) or {}
        else:
            raise ConfigError(f"config file {path} must end in .yaml, .yml, .toml or .json")
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of option names to values")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def build_options(cls: type, namespace: argparse.Namespace | dict | None = None, **overrides):
    """Defaults < config file (namespace._config) < flags in namespace < keyword overrides."""
    given = dict(vars(namespace)) if isinstance(namespace, argparse.Namespace) else dict(namespace or {})
    values: dict = {}
    config_path = given.pop("_config", None)
    if config_path:
        values.update(read_config_file(config_path))
    values.update({k: v for k, v in given.items() if not k.startswith("_") and k != "command"})
    values.update(overrides)
    values = _apply_preset(cls, values)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(fields))}")
    # List-valued options are parsed here, once: a config file's list becomes the flag's comma text.
    values = {k: join_list(v, _flag(k)) if fields[k].metadata.get("listed") else v for k, v in values.items()}
    values = validate_fields(cls, values, _flag)
    for f in dataclasses.fields(cls):
        if f.metadata.get("path") and values.get(f.name):
            check_writable(values[f.name], f.metadata["path"], _flag(f.name))
    return cls(**values)


def _apply_preset(cls: type, values: dict) -> dict:
    """A class with a PRESETS table ({name: {option: value}}) takes the named preset's values below
    the config file's and the flags' (defaults < preset < config file < flags)."""
    name = values.get("preset")
    if not name:
        return values
    table = getattr(cls, "PRESETS", {})
    if name not in table:
        raise ConfigError(f"--preset must be one of {', '.join(table) or '(none)'}, got {name!r}")
    return {**table[name], **values}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_writable(path: "str | Path", kind: str, name: str = "output") -> None:
    """Refuse, before any work, an output that cannot be written: an --out directory that is a
    file, a file that is a directory, or a place under a read-only or non-directory parent."""
    target = Path(path).expanduser()
    if target.exists():
        if kind == "out_dir" and not target.is_dir():
            raise ConfigError(f"{name} {path} is a file, not a directory")
        if kind == "out_file" and target.is_dir():
            raise ConfigError(f"{name} {path} is a directory, not a file")
    existing = target if kind == "out_dir" and target.is_dir() else target.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{name} {path} cannot be created: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{name} {path} cannot be written: no write permission in {existing}")


def save_effective_config(options, out_dir: "str | Path", name: str = "config.yaml") -> Path:
    from conca.fileio import atomic_write_bytes

    data = json.loads(json.dumps(dataclasses.asdict(options), default=str))
    path = Path(out_dir) / name
    atomic_write_bytes(path, yaml.safe_dump(data, sort_keys=False).encode())
    return path


def parse_key_values(text: str) -> dict:
    """'a=1,b=x,c=[1,2]' -> {'a': 1, 'b': 'x', 'c': [1, 2]} (values parsed as YAML scalars/lists)."""
    import yaml

    out: dict = {}
    for item in _split_top_level(text):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"bad option {item!r}: expected KEY=VALUE")
        try:
            out[key.strip()] = yaml.safe_load(value.strip())
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or "not a valid value"
            raise ConfigError(f"bad option {item.strip()!r}: {problem}") from None
    return out


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside brackets, so list values survive."""
    parts, depth, current = [], 0, ""
    for char in text:
        depth += char in "[{("
        depth -= char in "]})"
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    return parts + [current]
