"""A YAML mapping read into (nested) dataclasses by their type hints, every unknown, missing or mistyped key refused
in one line that names it (``rows.NAME.key`` for a list of named entries): the typed config of `toe study`."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal

from ..errors import ToEError


def _check_type(value: Any, hint: Any, where: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin is typing.Union or origin is getattr(types, "UnionType", None):
        if value is None and type(None) in args:
            return None
        return _check_type(value, next(a for a in args if a is not type(None)), where)
    if origin is Literal:
        if value not in args:
            raise ToEError(f"{where}: {value!r}: use one of {', '.join(map(str, args))}")
        return value
    if dataclasses.is_dataclass(hint):
        return build(hint, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise ToEError(f"{where}: {value!r}: expected a list")
        # a list of named entries (the study's rows) says which one by its name: rows.NAME
        return [_check_type(v, args[0], f"{where}.{v['name']}" if isinstance(v, dict) and isinstance(
            v.get("name"), str) else f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ToEError(f"{where}: {value!r}: expected a mapping (key: value)")
        return {str(k): _check_type(v, args[1], f"{where}.{k}") for k, v in value.items()}
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ToEError(f"{where}: {value!r}: expected {hint.__name__}")
    return value


def build(cls: type, raw: Any, where: str) -> Any:
    """``cls(**raw)`` with unknown, missing and mistyped keys refused in one line each."""
    if not isinstance(raw, dict):
        raise ToEError(f"{where or 'study config'}: expected a mapping of {', '.join(f.name for f in dataclasses.fields(cls))}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ToEError(f"{where or 'study config'}: unknown key {unknown[0]!r} (keys: {', '.join(known)})")
    missing = [n for n, f in known.items() if n not in raw and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ToEError(f"{where or 'study config'}: missing {missing[0]!r}")
    prefix = f"{where}." if where else ""
    kwargs = {}
    for k, v in raw.items():
        kwargs[k] = _check_type(v, hints[k], prefix + k)
    return cls(**kwargs)
