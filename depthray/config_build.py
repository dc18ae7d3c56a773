"""Dataclasses from YAML mappings, type-checked: the machinery under `depthray.config`.

Every problem is appended to one list rather than raised, so a config with three typos
is reported once with all three.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Mapping


def check_value(value: Any, tp: Any, where: str, errors: list[str]) -> Any:
    """Check `value` against annotation `tp`; return the (possibly coerced) value."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            sub: list[str] = []
            out = check_value(value, arg, where, sub)
            if not sub:
                return out
        errors.append(f"{where}: expected {_type_name(tp)}, got {value!r}")
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool):
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            errors.append(f"{where}: expected {tp.__name__}, got {value!r}")
        return value
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            errors.append(f"{where}: expected a mapping, got {value!r}")
        return value
    return value


def _type_name(tp: Any) -> str:
    args = typing.get_args(tp)
    if args:
        return " or ".join("null" if a is type(None) else a.__name__ for a in args)
    return getattr(tp, "__name__", str(tp))


def build(cls: type, data: Mapping[str, Any] | None, prefix: str, errors: list[str],
          bool_words: Mapping[str, Mapping[bool, str]] = {}):
    """Build dataclass `cls` from a mapping, appending one message per problem to `errors`."""
    data = {} if data is None else data
    if not isinstance(data, Mapping):
        errors.append(f"{prefix or 'config'}: expected a mapping, got {data!r}")
        return cls()
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            errors.append(f"{prefix}{key}: unknown key (valid: {', '.join(sorted(names))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        where = f"{prefix}{f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = build(tp, data[f.name], where + ".", errors, bool_words)
        else:
            value = data[f.name]
            if isinstance(value, bool) and where in bool_words:
                value = bool_words[where][value]
            kwargs[f.name] = check_value(value, tp, where, errors)
    return cls(**kwargs)


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping) and k != "options":
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
