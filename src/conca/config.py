"""Options as dataclasses, filled from defaults < a YAML/TOML config file < command-line flags.

Each command's options are one dataclass; its fields become `--flags` (help text from the
field's metadata), so a config file and the flags always name the same things, and the
effective config written next to every output can be fed back with `--config`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import tomllib
import types
import typing
from pathlib import Path

import yaml

from conca.errors import ConfigError, InputError


def option(default, help: str, **kwargs):
    """A dataclass field that carries its --help text."""
    return dataclasses.field(default=default, metadata={"help": help, **kwargs})


def _base_type(tp):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0]
    return tp


def _parse_bool(text: str) -> bool:
    lowered = str(text).lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def add_options(parser: argparse.ArgumentParser, cls: type) -> None:
    """One --flag per dataclass field; flags the user does not give stay out of the namespace."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = _base_type(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else None
        help_text = f.metadata.get("help", "")
        help_text += f" (default: {default})" if default not in (None, "") else ""
        kwargs = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        if tp is bool:
            kwargs.update(type=_parse_bool, metavar="BOOL")
        elif tp in (int, float, str):
            kwargs.update(type=tp, metavar=f.name.upper())
        else:
            kwargs.update(type=str, metavar=f.name.upper())
        parser.add_argument(flag, **kwargs)
    parser.add_argument("--config", dest="_config", default=argparse.SUPPRESS, metavar="FILE",
                        help="YAML or TOML file of options (keys as the flags, with _ or -); flags given here override it")


def read_config_file(path: "str | Path") -> dict:
    path = Path(path)
    if not path.exists():
        raise InputError(f"config file not found: {path}")
    text = path.read_text()
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
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    hints = typing.get_type_hints(cls)
    for key, value in list(values.items()):
        tp = _base_type(hints[key])
        if value is not None and tp in (int, float) and not isinstance(value, bool):
            try:
                values[key] = tp(value)
            except (TypeError, ValueError):
                raise ConfigError(f"option {key} must be a number, got {value!r}") from None
        elif value is not None and tp is bool and not isinstance(value, bool):
            values[key] = _parse_bool(value)
    return cls(**values)


def save_effective_config(options, out_dir: "str | Path", name: str = "config.yaml") -> Path:
    from conca.activations.store import atomic_write_bytes

    data = json.loads(json.dumps(dataclasses.asdict(options), default=str))
    path = Path(out_dir) / name
    atomic_write_bytes(path, yaml.safe_dump(data, sort_keys=False).encode())
    return path
