"""The typed configuration of `toe study` (a YAML file): the pair, the data, the budget, the rows, the scoring and the
named comparisons. Everything is checked here, before any model loads, with one line naming the key and the fix.

A study is data, not a script: the rows say *what* is trained and scored; :mod:`.study` plans, runs and resumes
them and :mod:`..evaluation.study_table` renders the table and the verdict from the per-item scores.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from ..config import ToEError

DEFAULT_TEMPLATE = "Question: {prompt}\nAnswer: "
RowKind = Literal["toe", "control", "lora", "toe_on_lora", "oracle"]
Objective = Literal["off_policy", "on_policy"]
Target = Literal["ce", "accuracy"]
TOY = "toy:"  # `toy:base`, `toy:teacher`, `toy:train`, `toy:dev`: the shipped toy pair and its generated data


@dataclass
class Pair:
    """The teacher and the base (folders or hub ids; ``toy:base``/``toy:teacher`` for the shipped toy pair)."""

    base: str
    teacher: str
    template: str = field(default=DEFAULT_TEMPLATE, metadata={"help": "prompt template, or `chat`"})
    dtype: Literal["float32", "float16", "bfloat16", "auto"] = "float32"


@dataclass
class Data:
    """Training traces and the evaluation items. ``reported`` and ``tuning`` are [start, stop) row ranges of
    ``items``: the study reports the first and never the second (tuning rows choose settings; checked disjoint)."""

    train: str = field(metadata={"help": "JSONL the trained rows learn from (e.g. the teacher's traces)"})
    items: str = field(metadata={"help": "JSONL of evaluation items (question/answer)"})
    reported: list[int] = field(default_factory=lambda: [0, 100])
    tuning: list[int] | None = None
    prompt_field: str | None = None
    response_field: str | None = None
    max_length: int = 512
    task: Literal["gsm8k", "math"] = "gsm8k"

    def __post_init__(self) -> None:
        for name in ("reported", "tuning"):
            span = getattr(self, name)
            if span is not None and (len(span) != 2 or not 0 <= span[0] < span[1]):
                raise ToEError(f"data.{name}: {span}: give [start, stop) rows of data.items, 0 <= start < stop")
        if self.tuning and max(self.tuning[0], self.reported[0]) < min(self.tuning[1], self.reported[1]):
            raise ToEError(f"data.tuning {self.tuning} overlaps data.reported {self.reported}: the rows used to tune "
                           "settings must never be reported; give disjoint ranges")


@dataclass
class Budget:
    """Every trained row's budget: ``steps`` optimiser steps, or ``epochs`` passes over data.train, of
    ``batch_size`` sequences."""

    steps: int | None = None
    epochs: float | None = None
    batch_size: int = 4

    def __post_init__(self) -> None:
        if (self.steps is None) == (self.epochs is None):
            raise ToEError("budget: give exactly one of steps and epochs")
        if (self.steps is not None and self.steps < 1) or (self.epochs is not None and self.epochs <= 0) \
                or self.batch_size < 1:
            raise ToEError(f"budget: steps {self.steps}, epochs {self.epochs}, batch_size {self.batch_size}: each "
                           "must be positive")

    def steps_for(self, n_train: int) -> int:
        return self.steps if self.steps is not None else max(1, math.ceil(self.epochs * n_train / self.batch_size))


@dataclass
class Row:
    """One system of the table.

    Kinds: ``toe`` (a plug-in at ``layers``), ``control`` (the same pipeline without the teacher), ``lora``
    (rank ``rank``; with ``layers`` it distils that extraction's cached teacher top-k off-policy), ``toe_on_lora``
    (a plug-in trained on the adapted base of the lora row ``adapter_of``, seed for seed), ``oracle`` (the
    live-teacher oracles at ``layers`` next to the finished plug-in row ``plugin_of``: CE only, seed 0).
    """

    name: str
    kind: RowKind
    layers: list[int] | None = None
    objective: Objective = "off_policy"
    rank: int = 8
    seeds: int = 1
    adapter_of: str | None = None
    plugin_of: str | None = None
    options: dict[str, Any] = field(default_factory=dict, metadata={"help": "extra `toe train`/`toe baseline` "
                                                                            "options of this row"})

    def __post_init__(self) -> None:
        if not self.name or any(c in self.name for c in "/: ") or self.name in ("anchors", "base", "teacher"):
            raise ToEError(f"rows: name {self.name!r}: use a plain name without '/', ':' or spaces (not anchors, "
                           "base or teacher, which every study has)")
        if self.seeds < 1:
            raise ToEError(f"rows.{self.name}.seeds {self.seeds}: must be >= 1")
        if self.kind in ("toe", "control", "toe_on_lora", "oracle") and not self.layers:
            raise ToEError(f"rows.{self.name}: a {self.kind} row needs layers (the injection layers, e.g. [5, 11, 17])")
        if self.kind == "toe_on_lora" and not self.adapter_of:
            raise ToEError(f"rows.{self.name}: a toe_on_lora row needs adapter_of (the lora row it trains on)")
        if self.kind == "oracle" and not self.plugin_of:
            raise ToEError(f"rows.{self.name}: an oracle row needs plugin_of (the toe row whose plug-in it compares)")
        if self.kind == "control" and self.objective == "on_policy":
            raise ToEError(f"rows.{self.name}: the control has no teacher to distil on-policy: use off_policy")

    def labels(self) -> list[str]:
        """The run names of its seeds: ``name`` for seed 0, ``name-seedK`` for seed K."""
        return [self.name] + [f"{self.name}-seed{k}" for k in range(1, self.seeds if self.kind != "oracle" else 1)]


@dataclass
class Scoring:
    """What every row is scored on: ``ce`` (CE on the teacher's greedy answers to the reported items),
    ``accuracy`` (graded greedy answers to them), and CE on each file of ``ce_files`` ({name: JSONL of
    ``prompt``/``text`` rows}, e.g. held-out code: what a row costs outside the task)."""

    targets: list[Target] = field(default_factory=lambda: ["ce"])
    ce_files: dict[str, str] = field(default_factory=dict)
    batch_size: int = 4
    max_new_tokens: int = 256
    answer_batch_size: int = 8


@dataclass
class StudyConfig:
    """A whole study. ``compare``: named paired comparisons ``A - B`` (row names, ``base`` or ``teacher``), in the
    order the verdict reads them. ``extract``/``train``/``lora``: options passed to every `toe extract`, plug-in row
    (`toe train`, and the control's `toe baseline`) and LoRA row. ``work``: where the extractions and checkpoints
    go (default OUT/work; large, never committed)."""

    name: str
    pair: Pair
    data: Data
    budget: Budget
    rows: list[Row]
    compare: list[str] = field(default_factory=list)
    scoring: Scoring = field(default_factory=Scoring)
    extract: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    lora: dict[str, Any] = field(default_factory=dict)
    work: str | None = None
    readme: str | None = None

    def __post_init__(self) -> None:
        names = [r.name for r in self.rows]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ToEError(f"rows: {dup} named twice: give every row its own name")
        by = {r.name: r for r in self.rows}
        for r in self.rows:
            ref = r.adapter_of or r.plugin_of
            want = "lora" if r.adapter_of else "toe"
            if ref and (ref not in by or by[ref].kind != want):
                raise ToEError(f"rows.{r.name}: {'adapter_of' if r.adapter_of else 'plugin_of'} {ref!r} is not a "
                               f"{want} row of this study")
            if r.kind == "toe_on_lora" and by[r.adapter_of].seeds < r.seeds:
                raise ToEError(f"rows.{r.name}: {r.seeds} seeds on {r.adapter_of}'s {by[r.adapter_of].seeds}: give "
                               "the adapter row at least as many seeds")
        for c in self.compare:
            a, b = comparison(c)
            for side in (a, b):
                if side not in by and side not in ("base", "teacher"):
                    raise ToEError(f"compare {c!r}: {side!r} is not a row of this study (rows: {', '.join(names)})")
        for group, fn in (("extract", "extract"), ("train", "train"), ("lora", "baseline")):
            check_options(group, getattr(self, group), fn)
        for r in self.rows:
            check_options(f"rows.{r.name}.options", r.options, "baseline" if r.kind in ("lora", "control") else
                          "oracle" if r.kind == "oracle" else "train")

    def row(self, name: str) -> Row:
        return {r.name: r for r in self.rows}[name]


def comparison(text: str) -> tuple[str, str]:
    """``"A - B"`` -> (A, B)."""
    a, sep, b = text.partition(" - ")
    if not sep or not a.strip() or not b.strip():
        raise ToEError(f"compare {text!r}: write `A - B` (row names with spaces around the minus)")
    return a.strip(), b.strip()


# Options the study sets itself: a config that sets them too would be ignored or contradict the plan.
STUDY_SETS = {"base", "teacher", "experts", "data", "out", "max_steps", "batch_size", "seed", "template",
              "prompt_field", "response_field", "max_length", "resume", "overwrite", "kind", "lora_rank", "objective",
              "base_adapter", "plugin", "layers", "dtype"}
EXTRACT_FREE = {"batch_size", "seed"}  # an extraction's own batch size and seed are its to choose


def check_options(where: str, options: dict, command: str) -> None:
    """Every key of ``options`` is a parameter of the library function of ``command`` that the study leaves free."""
    from importlib import import_module

    module = {"extract": "commands.extract", "train": "commands.train", "baseline": "recipes.baseline",
              "oracle": "commands.oracle"}[command]
    params = set(inspect.signature(getattr(import_module(f"..{module}", __package__), command)).parameters)
    for key in options:
        if key in STUDY_SETS and not (command == "extract" and key in EXTRACT_FREE):
            raise ToEError(f"{where}.{key}: the study sets {key} itself (pair, data, budget, row fields): remove it")
        if key not in params:
            close = [p for p in sorted(params - STUDY_SETS) if p[:4] == key[:4]][:3]
            raise ToEError(f"{where}.{key}: not an option of `toe {command}`" +
                           (f" (did you mean {', '.join(close)}?)" if close else ""))


# -- reading the YAML into the dataclasses, with one-line errors -----------------------------------------------------
def _check_type(value: Any, hint: Any, where: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin is typing.Union or origin is getattr(__import__("types"), "UnionType", None):
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
        return [_check_type(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
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
        raise ToEError(f"{where}: expected a mapping of {', '.join(f.name for f in dataclasses.fields(cls))}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ToEError(f"{where}: unknown key {unknown[0]!r} (keys: {', '.join(known)})")
    missing = [n for n, f in known.items() if n not in raw and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ToEError(f"{where}: missing {missing[0]!r}")
    label = (lambda k, v: f"{where}.{v.get('name', k)}" if isinstance(v, dict) else f"{where}[{k}]")
    kwargs = {}
    for k, v in raw.items():
        if k == "rows" and isinstance(v, list):
            kwargs[k] = [build(Row, r, label(i, r)) for i, r in enumerate(v)]
        else:
            kwargs[k] = _check_type(v, hints[k], f"{where}.{k}" if where else k)
    return cls(**kwargs)


def load_study(path: str) -> StudyConfig:
    """Reads and checks a study YAML (paths in it are relative to the current folder, or absolute)."""
    import yaml

    if not os.path.isfile(path):
        raise ToEError(f"study config {path} not found: pass a YAML file (studies/toy.yaml is an example)")
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise ToEError(f"study config {path} is not valid YAML ({str(e).splitlines()[0]})") from None
    cfg = build(StudyConfig, raw, "")
    return cfg
