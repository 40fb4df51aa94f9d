"""Strict conversion of option values to their declared types, and the declared range checks.

One place for every command's options (`conca.config.build_options`) and every dictionary
method's config (`Dictionary.from_config_dict`): an int accepts an int, an integral float or
string ("1e3"), never a bool or 20.9; a float accepts a finite number; a bool accepts only
true/false forms; a str accepts text (numbers are written as text). Ranges come from a field's
metadata: ``min``/``max`` (inclusive), ``gt``/``lt`` (exclusive) and ``choices``."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any

from conca.errors import ConfigError

TRUE_FORMS = ("true", "yes", "on", "1")
FALSE_FORMS = ("false", "no", "off", "0")
RANGE_KEYS = ("min", "max", "gt", "lt", "choices")


def parse_bool(value: Any, name: str = "value") -> bool:
    """True/False from a bool, 0/1, or one of the forms true/false, yes/no, on/off, 1/0."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in TRUE_FORMS + FALSE_FORMS:
        return value.strip().lower() in TRUE_FORMS
    raise ConfigError(f"{name} must be true or false, got {value!r}")


def _to_int(value: Any, name: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    number = value
    if isinstance(value, str):
        text = value.strip()
        try:
            return int(text)
        except ValueError:
            try:
                number = float(text)
            except ValueError:
                number = None
    if isinstance(number, float) and math.isfinite(number) and number.is_integer():
        return int(number)
    raise ConfigError(f"{name} must be an integer, got {value!r}")


def _to_float(value: Any, name: str) -> float:
    number = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            pass
    if number is None:
        raise ConfigError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(number):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    return number


def _to_str(value: Any, name: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # e.g. YAML `layers: 6` for the text "6"
    raise ConfigError(f"{name} must be text, got {value!r}")


def coerce(value: Any, tp: Any, name: str) -> Any:
    """`value` as type `tp` (int, float, bool, str, list[...], X | None), or a ConfigError naming `name`.
    Types this does not know (tensors, dicts, ...) pass through unchanged."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        # A value already of one of the types keeps it (in int | float, 1.0 stays a float).
        ordered = sorted(options, key=lambda a: type(value) is not a)
        first_error = None
        for option_type in ordered:
            try:
                return coerce(value, option_type, name)
            except ConfigError as exc:
                first_error = first_error or exc
        if len(options) == 1:
            raise first_error
        raise ConfigError(f"{name} must be {' or '.join(_describe(a) for a in options)}, got {value!r}")
    if origin is list or tp is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        (item_type,) = typing.get_args(tp) or (Any,)
        return [coerce(item, item_type, f"{name}[{i}]") for i, item in enumerate(value)]
    if value is None and tp in (int, float, bool, str):
        raise ConfigError(f"{name} must be {_describe(tp)}, got None")
    if tp is bool:
        return parse_bool(value, name)
    if tp is int:
        return _to_int(value, name)
    if tp is float:
        return _to_float(value, name)
    if tp is str:
        return _to_str(value, name)
    return value


def _describe(tp: Any) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "text"}.get(tp, str(tp))


def check_range(value: Any, metadata: typing.Mapping, name: str) -> None:
    """The range a field declares in its metadata (min/max inclusive, gt/lt exclusive, choices)."""
    if value is None:
        return
    choices = metadata.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(map(str, choices))}, got {value!r}")
    bounds = (("min", lambda v, b: v >= b, ">="), ("max", lambda v, b: v <= b, "<="),
              ("gt", lambda v, b: v > b, ">"), ("lt", lambda v, b: v < b, "<"))
    for key, holds, symbol in bounds:
        bound = metadata.get(key)
        if bound is not None and isinstance(value, (int, float)) and not holds(value, bound):
            raise ConfigError(f"{name} must be {symbol} {bound}, got {value!r}")


def describe_range(metadata: typing.Mapping) -> str:
    """The declared range in words, for --help: e.g. '>= 1', '> 0, < 1', 'one of none, bf16'."""
    parts = [f"{symbol} {metadata[key]}" for key, symbol in (("min", ">="), ("gt", ">"), ("max", "<="), ("lt", "<"))
             if metadata.get(key) is not None]
    if metadata.get("choices") is not None:
        parts.append("one of " + ", ".join(map(str, metadata["choices"])))
    return ", ".join(parts)


def validate_fields(cls: type, values: dict, label: typing.Callable[[str], str]) -> dict:
    """`values` (a subset of dataclass `cls`'s fields) converted to the declared types and checked
    against the declared ranges; `label(field)` names a field in messages."""
    hints = typing.get_type_hints(cls)
    meta = {f.name: f.metadata for f in dataclasses.fields(cls)}
    out = {}
    for key, value in values.items():
        converted = coerce(value, hints[key], label(key)) if key in hints else value
        check_range(converted, meta.get(key, {}), label(key))
        out[key] = converted
    return out
