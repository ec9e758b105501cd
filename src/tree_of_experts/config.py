"""Plug-in configuration: what ``toe_config.json`` holds, validated where it is built."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import ToEError  # noqa: F401 (re-exported: `from tree_of_experts.config import ToEError` stays valid)
from .tree import SELECTIONS, check_tree, num_nodes, tree_depth

FORMAT_VERSION = 1
CONFIG_NAME = "toe_config.json"
WEIGHTS_NAME = "toe_model.safetensors"


BANK_DTYPES = ("float32", "float16", "bfloat16")


@dataclass
class ToEConfig:
    """One plug-in: a tree gate + expert bank + scale at each injection layer of one base model.

    Attributes:
        base_model: hub id or path of the base the plug-in was built for (informational; matching uses the hash).
        base_name: the base's hub id, or the name of its folder: a record that survives moving the files.
        base_weight_sample: a few of the base's weight values (:func:`tree_of_experts.hf.weight_sample`), recorded
            the first time the plug-in is attached; a base with the same architecture but other weights is warned
            about at load.
        base_arch: the base config fields that must match (see :func:`tree_of_experts.hf.arch_fingerprint`).
        base_config_hash: sha256 of ``base_arch``.
        hidden_size: D of the base.
        layers: decoder layers (0-based) whose output receives the injection.
        num_leaves: N leaves per injection layer.
        shape: "balanced" (ToE-B), "deep" (ToE-D) or "flat" (softmax-router baseline).
        selection: "dense", "topk", "topp" or "beam".
        top_k: K (and the cap on adaptive K for top-p, the beam width for beam).
        top_p: mass kept by top-p.
        gate_rank: r, the gate trunk's width.
        intensity: learn the null/intensity gate a_t.
        clip: κ in ||Δ|| <= κ ||h||.
        base_adapter: a peft adapter (a folder inside the plug-in folder, e.g. "base_adapter") merged into the base
            before the plug-in attaches: ToE trained on top of a LoRA-adapted base, a system of its own.
        query_norm: normalise the gate's query (its trunk features, LayerNorm without affine) before the node
            logits, as memory layers do (PKM, PEER, Memory Layers at Scale) so routing stays sharp while the trunk
            trains.
        bank_dtype: the dtype the bank is saved in: "float32", or "float16" / "bfloat16" to halve the file (and the
            pages a mapped bank reads); loaded into RAM it computes in float32 either way.
    """

    hidden_size: int
    layers: list[int]
    num_leaves: int
    shape: str = "balanced"
    selection: str = "topk"
    top_k: int = 4
    top_p: float = 0.9
    gate_rank: int = 64
    intensity: bool = False
    clip: float = 0.5
    query_norm: bool = False
    bank_dtype: str = "float32"
    base_adapter: str | None = None
    base_model: str = ""
    base_name: str = ""
    base_revision: str | None = None
    base_arch: dict[str, Any] = field(default_factory=dict)
    base_config_hash: str = ""
    base_weight_sample: list[float] | None = None
    teacher_model: str | None = None
    teacher_layers: list[int] | None = None
    bank_info: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):  # a hand-edited `"top_k": 4.0` would fail deep inside torch.topk
            problem = _type_problem(getattr(self, f.name), hints[f.name])
            if problem:
                raise ToEError(f"{f.name}={getattr(self, f.name)!r} {problem}")
        if self.hidden_size < 1:
            raise ToEError(f"hidden_size={self.hidden_size}: must be >= 1 (the base's hidden size D)")
        check_routing(self.shape, self.num_leaves, self.selection, self.top_k)
        if not self.base_name and self.base_model:
            self.base_name = portable_name(self.base_model)
        if not self.layers:
            raise ToEError("layers is empty: give at least one decoder layer index to inject into")
        if len(set(self.layers)) != len(self.layers) or any(layer < 0 for layer in self.layers):
            raise ToEError(f"layers={self.layers}: give distinct non-negative decoder layer indices")
        if self.teacher_layers is not None and any(layer < 0 for layer in self.teacher_layers):
            raise ToEError(f"teacher_layers={self.teacher_layers}: give non-negative teacher layer indices")
        if self.teacher_layers is not None and len(self.teacher_layers) != len(self.layers):
            raise ToEError(
                f"teacher_layers={self.teacher_layers} has {len(self.teacher_layers)} entries but layers={self.layers} "
                f"has {len(self.layers)}: give one teacher layer per injection layer"
            )
        if not 0.0 < self.top_p <= 1.0:
            raise ToEError(f"top_p={self.top_p}: must be in (0, 1]")
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise ToEError(f"clip={self.clip}: the norm clip κ must be a finite number > 0")
        if self.bank_dtype not in BANK_DTYPES:
            raise ToEError(f"bank_dtype={self.bank_dtype!r}: use one of {BANK_DTYPES}")
        if self.gate_rank < 1:
            raise ToEError(f"gate_rank={self.gate_rank}: must be >= 1")
        if self.format_version < 1:
            raise ToEError(f"format_version={self.format_version} is not a plug-in format (the first is 1): the "
                           "config was edited or written by a pre-release; rebuild the plug-in with `toe extract`")
        if self.format_version > FORMAT_VERSION:
            raise ToEError(
                f"format_version={self.format_version} is newer than this library's {FORMAT_VERSION}: "
                "upgrade tree-of-experts"
            )

    @property
    def depth(self) -> int:
        return tree_depth(self.shape, self.num_leaves)

    @property
    def num_nodes(self) -> int:
        return num_nodes(self.shape, self.num_leaves)

    def with_routing(self, selection: str | None = None, top_k: int | None = None,
                     top_p: float | None = None) -> ToEConfig:
        """This config routing with another selection, K or p (None keeps the value); the config's own checks give a
        one-line ToEError for a value that does not fit."""
        overrides = {k: v for k, v in (("selection", selection), ("top_k", top_k), ("top_p", top_p)) if v is not None}
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, directory: str | os.PathLike) -> None:
        from .files import atomic_write_text

        atomic_write_text(os.path.join(directory, CONFIG_NAME), json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | os.PathLike) -> ToEConfig:
        path = os.path.join(directory, CONFIG_NAME)
        if not os.path.isfile(path):
            raise ToEError(f"{path} not found: pass a plug-in folder written by save_pretrained or `toe extract`")
        try:
            with open(path) as f:
                data = json.load(f)
        except json.JSONDecodeError as e:
            raise ToEError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}): re-save the plug-in") from None
        if not isinstance(data, dict):
            raise ToEError(f"{path} holds a JSON {type(data).__name__}, not a plug-in config: re-save the plug-in")
        if "format_version" not in data:
            raise ToEError(f"{path} has no format_version: it was not written by tree-of-experts' save_pretrained; "
                           "rebuild the plug-in with `toe extract`")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ToEError(f"{path} has unknown fields {unknown}: it was written by a newer tree-of-experts; upgrade")
        required = [f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        missing = [name for name in required if name not in data]
        if missing:
            raise ToEError(f"{path} has no {', '.join(missing)}: the file was cut or edited; re-save the plug-in (or "
                           "restore the field)")
        try:
            return cls(**data)
        except ToEError as e:
            raise ToEError(f"{path}: {e}") from None


def _type_problem(value: Any, hint: Any) -> str | None:
    """What is wrong with ``value`` for the annotation ``hint`` (int, float, bool, str, list[X], dict[str, X],
    X | None), as the end of a sentence that says how to write it; None when it fits. An int is a float; a bool is
    not a number."""
    if hint is Any:
        return None
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        problems = [_type_problem(value, a) for a in inner]
        if any(p is None for p in problems):
            return None
        return problems[0] + (" (or null)" if type(None) in args else "")
    if hint is bool:
        return None if isinstance(value, bool) else "must be true or false"
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return None
        whole = isinstance(value, float) and value.is_integer()
        return f"must be a whole number{f' (write {int(value)})' if whole else ''}"
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return None if ok else "must be a number"
    if hint is str:
        return None if isinstance(value, str) else "must be a string"
    origin = typing.get_origin(hint)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            return f"must be a list of {_NAMES.get(args[0], 'values')}"
        bad = next((v for v in value if _type_problem(v, args[0])), None) if args else None
        return None if bad is None else f"must be a list of {_NAMES.get(args[0], 'values')} ({bad!r} is not one)"
    if origin is dict:
        if not isinstance(value, dict):
            return "must be an object ({...})"
        bad = next((k for k, v in value.items() if _type_problem(v, args[1])), None) if len(args) == 2 else None
        return None if bad is None else f"must map names to {_NAMES.get(args[1], 'values')} ({bad!r} does not)"
    return None


_NAMES = {int: "whole numbers", float: "numbers", str: "strings", bool: "true/false values"}


def check_routing(shape: str, num_leaves: int, selection: str, top_k: int) -> None:
    """The tree and its selection: one line naming the fix for each way they can be wrong."""
    if isinstance(num_leaves, bool) or not isinstance(num_leaves, int):
        raise ToEError(f"num_leaves={num_leaves!r}: give a whole number of leaves (a power of two if balanced)")
    try:
        check_tree(shape, num_leaves)
    except ValueError as e:
        raise ToEError(str(e)) from None
    if selection not in SELECTIONS:
        raise ToEError(f"selection={selection!r} is unknown: use one of {SELECTIONS}")
    if selection == "beam" and shape != "balanced":
        raise ToEError("selection='beam' needs shape='balanced'; use selection='topp' for a deep tree")
    if not 1 <= top_k <= num_leaves:
        raise ToEError(f"top_k={top_k} with num_leaves={num_leaves}: K must be in [1, N] (K of the N leaves are mixed)")


def portable_name(name_or_path: str) -> str:
    """A hub id as it is; a local folder by its own name (an absolute path means nothing on another machine)."""
    if os.path.isabs(name_or_path) or os.path.isdir(name_or_path):
        return os.path.basename(os.path.normpath(name_or_path))
    return name_or_path


# -- the choices and checks of the commands' options (declared in tree_of_experts.options) --------------------------
Shape = Literal["balanced", "deep", "flat"]
ExtractShape = Literal["balanced", "deep"]
Signal = Literal["fusion_map", "ridge"]
Selection = Literal["dense", "topk", "topp", "beam"]
DType = Literal["float32", "float16", "bfloat16", "auto"]
MixedPrecision = Literal["no", "fp16", "bf16"]
Task = Literal["gsm8k", "math", "code"]
CETarget = Literal["gold_clean", "gold", "trace"]
BaselineKind = Literal["control", "static", "random", "flat", "lora", "sft"]
