"""Building a config dataclass from plain data: every key checked against the field's type hint and
limits (`opt` metadata in pipeline.config), with an error that names the key and the fix."""
from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from typing import Any

import yaml


class ConfigError(ValueError):
    """A bad key, type or value in the configuration (CLI exit code 2)."""


# A number in plain decimal or scientific notation. YAML 1.1 (PyYAML) reads `1e-4` and `5E3` (no dot) as strings,
# so a number field accepts such a string; float() alone would also let "nan", "inf", "1_0" and " 1" through.
_DECIMAL = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")


def parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key.sub=value, e.g. --set embed.batch_size=64")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def set_nested(data: dict, parts: list[str], value, full_key: str) -> None:
    for part in parts[:-1]:
        node = data.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {full_key}: {part} is not a section")
        data = node
    data[parts[-1]] = value


def build(cls, data: dict, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.')} must be a section (a mapping of keys), got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            raise ConfigError(_unknown_key_message(prefix + str(key), list(fields)))
    kwargs = {}
    for name, f in fields.items():
        if name not in data:
            continue
        hint = typing.get_type_hints(cls)[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = build(hint, data[name], f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(prefix + name, hint, data[name], f.metadata)
    return cls(**kwargs)


def _unknown_key_message(key: str, valid: list[str]) -> str:
    import difflib

    leaf = key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(leaf, valid, n=1)
    hint = f"did you mean {key.rsplit('.', 1)[0] + '.' if '.' in key else ''}{close[0]}?" if close else f"valid keys: {', '.join(valid)}"
    return f"unknown config key {key}: {hint}"


def _coerce(key: str, hint, value, meta) -> Any:
    """Check `value` against the field's type hint and limits; return it (ints widened to float)."""
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union else (hint,)
    if value is None:
        if type(None) in allowed:
            return None
        raise ConfigError(f"{key} must not be null: give {_article(_type_name(allowed))}")
    for t in allowed:
        if t is type(None):
            continue
        ok, coerced = _matches(t, value)
        if ok:
            if t is float and not math.isfinite(coerced):  # nan passes every min/max comparison; "1e999" is inf
                raise ConfigError(_not_finite_message(key, value, meta, nullable=type(None) in allowed))
            _check_limits(key, coerced, meta)
            return coerced
    raise ConfigError(f"{key} must be {_article(_type_name(allowed))}, got {value!r} ({type(value).__name__})"
                      + _digits_hint(allowed, value))


def _matches(t, value) -> tuple[bool, Any]:
    if t is bool:
        return isinstance(value, bool), value
    if t is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if t is float:
        if isinstance(value, str) and _DECIMAL.fullmatch(value):
            return True, float(value)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if t is str:
        return isinstance(value, str), value
    if typing.get_origin(t) is list:
        (item,) = typing.get_args(t)
        if isinstance(value, str):  # --set sample.prompts="a cat" means a one-item list
            value = [value]
        ok = isinstance(value, list) and all(_matches(item, v)[0] for v in value)
        return ok, value
    raise TypeError(f"unsupported config type {t}")


def _not_finite_message(key: str, value: float, meta, nullable: bool) -> str:
    low, high = meta.get("min"), meta.get("max")
    span = (f" from {low} to {high}" if low is not None and high is not None else f" of at least {low}" if low is not None
            else f" of at most {high}" if high is not None else "")
    return f"{key} must be a finite number, got {value!r}: give a number{span}{', or null' if nullable else ''}"


def _digits_hint(allowed, value) -> str:
    """An integer field given 1e3 or 1000.0: say how to write it (no silent rounding or float-to-int coercion)."""
    if int not in allowed or float in allowed or isinstance(value, bool):
        return ""
    if not (isinstance(value, float) or isinstance(value, str) and _DECIMAL.fullmatch(value)):
        return ""
    number = float(value)
    example = f", e.g. {int(number)}" if math.isfinite(number) and number.is_integer() else ""
    return f": write a whole number in plain digits{example}"


def _article(name: str) -> str:
    return f"an {name}" if name[0] in "aeiou" else f"a {name}"


def _type_name(allowed) -> str:
    names = {bool: "boolean (true/false)", int: "integer", float: "number", str: "string", list[int]: "list of integers"}
    return " or ".join(names.get(t, "list of strings") for t in allowed if t is not type(None))


def _check_limits(key: str, value, meta) -> None:
    if meta.get("choices") and value not in meta["choices"]:
        raise ConfigError(f"{key} must be one of {', '.join(map(str, meta['choices']))}, got {value!r}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if meta.get("min") is not None and value < meta["min"]:
            raise ConfigError(f"{key} must be at least {meta['min']}, got {value!r}")
        if meta.get("max") is not None and value > meta["max"]:
            raise ConfigError(f"{key} must be at most {meta['max']}, got {value!r}")
