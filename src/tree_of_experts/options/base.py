"""What every option group is (a frozen dataclass whose Literal fields are checked, then its ranges) and how a
command takes groups: :func:`grouped` routes flat keywords to their group, :func:`flat_args` records a run flat,
:func:`require` / :func:`unused` refuse or warn about options a command does not read."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import math
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Callable, Literal

from ..errors import ToEError

log = logging.getLogger(__name__)

DEFAULT_TEMPLATE = "Question: {prompt}\nAnswer: "
DType = Literal["float32", "float16", "bfloat16", "auto"]
Objective = Literal["off_policy", "on_policy"]


# -- the checks a group's fields run (one-line ToEErrors naming the value) ---------------------------------------
MAX_LR = 1.0  # Adam moves each weight by about lr per step: above 1 nothing sensible is trained


def literal_values(hint: Any) -> tuple | None:
    """The allowed values of a Literal (or Literal | None) annotation, else None."""
    if typing.get_origin(hint) is Literal:
        return typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        parts = [literal_values(a) for a in typing.get_args(hint) if a is not type(None)]
        if parts and all(p is not None for p in parts):
            return tuple(v for p in parts for v in p) + (None,)
    return None


def at_least(name: str, value: Any, low: int, what: str = "") -> None:
    """Refuses (one line) ``value`` unless it is a whole number >= ``low``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ToEError(f"{name}={value!r}: must be a whole number >= {low}{what}")


def optional_at_least(name: str, value: Any, low: int, what: str = "") -> None:
    """:func:`at_least` where ``value`` is not None."""
    if value is not None:
        at_least(name, value, low, what)


def finite(name: str, value: Any, low: float | None = None, high: float | None = None, what: str = "") -> None:
    """Refuses (one line) ``value`` unless it is a finite number in [``low``, ``high``] (either bound optional)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (low is None or value >= low) and (high is None or value <= high)
    if not ok:
        span = f"in [{low}, {high}]" if low is not None and high is not None else (
            f">= {low}" if low is not None else f"<= {high}" if high is not None else "finite")
        raise ToEError(f"{name}={value!r}: must be a finite number {span}{what}")


def learning_rate(name: str, value: Any) -> None:
    """Refuses (one line) a learning rate outside [0, MAX_LR]."""
    finite(name, value, 0.0, MAX_LR, " (a learning rate; this project trains with 1e-4 to 1e-2)")


@dataclass(frozen=True)
class OptionGroup:
    """A group of options: Literal fields are checked against their choices, then :meth:`check` runs (every class
    of a group is a dataclass, so jsonargparse shows its fields as nested options)."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            allowed = literal_values(hints[f.name])
            value = getattr(self, f.name)
            if allowed is not None and value not in allowed:
                choices = ", ".join(repr(v) for v in allowed if v is not None)
                raise ToEError(f"{f.name}={value!r} is unknown: use one of {choices}")
        self.check()

    def check(self) -> None:
        """Value checks beyond the Literal choices (ToEError with the fix)."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _group_params(sig: inspect.Signature, hints: dict) -> dict[str, type]:
    return {name: hints[name] for name in sig.parameters
            if isinstance(hints.get(name), type) and issubclass(hints[name], OptionGroup)}


def grouped(fn: Callable) -> Callable:
    """Lets ``fn``'s option-group parameters also be given field by field, as flat keywords: ``train(...,
    beta=0.3)`` is ``train(..., loss=Loss(beta=0.3))`` (given with a group, the flat field wins). A field name
    must belong to one group of ``fn``; an unknown keyword is a TypeError as for any function."""
    sig = inspect.signature(fn)
    groups = _group_params(sig, typing.get_type_hints(fn))
    owner: dict[str, str] = {}
    for param, cls in groups.items():
        for f in dataclasses.fields(cls):
            if f.name in owner or f.name in sig.parameters:
                raise TypeError(f"{fn.__name__}: option {f.name!r} is declared twice")
            owner[f.name] = param

    @functools.wraps(fn)
    def call(*args, **kwargs):
        flat: dict[str, dict] = {}
        for name in [k for k in kwargs if k not in sig.parameters]:
            if name not in owner:
                raise TypeError(f"{fn.__name__}() got an unexpected keyword argument {name!r}")
            flat.setdefault(owner[name], {})[name] = kwargs.pop(name)
        for param, fields in flat.items():
            given = kwargs.get(param) or sig.parameters[param].default
            kwargs[param] = dataclasses.replace(given, **fields)
        return fn(*args, **kwargs)

    call.option_owner = owner  # {flat field name: group parameter}: the CLI's old spellings
    return call


def option_names(fn: Callable) -> set[str]:
    """Every keyword ``fn`` takes, an option group's fields included (flat) and the groups' own names left out."""
    params = inspect.signature(fn).parameters
    owner = getattr(fn, "option_owner", {})
    return {p for p in params if p not in set(owner.values())} | set(owner)


def flat_args(args: dict[str, Any]) -> dict[str, Any]:
    """A command's arguments with every option group spread into its fields: the run's record (``*_args.json``),
    which `--resume` and the study compare field by field."""
    out: dict[str, Any] = {}
    for name, value in args.items():
        if isinstance(value, OptionGroup):
            out.update(value.to_dict())
        else:
            out[name] = value
    return out


def flat_defaults(fn: Callable) -> dict[str, Any]:
    """{option: default} of ``fn`` (every parameter: a required one's is ``inspect.Parameter.empty``), option
    groups spread into their fields (the defaults of :func:`flat_args`)."""
    params = inspect.signature(fn).parameters  # a required one's "default" is inspect.Parameter.empty
    return flat_args({k: p.default for k, p in params.items()})


def changed(group: OptionGroup, names: Iterable[str]) -> list[str]:
    """The fields of ``group`` among ``names`` that are set away from the group's defaults, in ``names``' order."""
    defaults = type(group)()
    return [n for n in names if getattr(group, n) != getattr(defaults, n)]


def unused(what: str, group: OptionGroup, names: Iterable[str], why: str) -> list[str]:
    """Warns (one line) about the options of ``group`` in ``names`` that ``what`` does not read but were set away
    from their defaults: a value the user gave is never silently ignored. Returns their names."""
    given = changed(group, names)
    if given:
        log.warning("%s: %s %s no effect (%s)", what, ", ".join(f"--{n}" for n in given),
                    "has" if len(given) == 1 else "have", why)
    return given


def require(fn_name: str, group: OptionGroup, not_read: dict[str, str]) -> None:
    """Refuses options of ``group`` that ``fn_name`` does not read when set away from their defaults ({field:
    why}), where running without them would mislead (a value the user gave is never silently ignored)."""
    given = changed(group, not_read)
    if given:
        raise ToEError(f"{fn_name}: --{given[0]} has no effect here ({not_read[given[0]]}): drop it")


def refuse_unused(fn_name: str, group: OptionGroup, used: typing.Iterable[str], why: str | dict[str, str]) -> None:
    """:func:`require` for every field of ``group`` but ``used``: ``why`` says why they have no effect here (one
    reason for all, or {field: reason} with ``why[""]`` for the rest)."""
    reasons = why if isinstance(why, dict) else {}
    rest = why if isinstance(why, str) else why.get("", "not read here")
    require(fn_name, group, {f.name: reasons.get(f.name, rest) for f in dataclasses.fields(group)
                             if f.name not in set(used)})
