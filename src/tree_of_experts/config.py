"""Plug-in configuration: what ``toe_config.json`` holds, validated where it is built."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

from .tree import SELECTIONS, check_tree, num_nodes, tree_depth

FORMAT_VERSION = 1
CONFIG_NAME = "toe_config.json"
WEIGHTS_NAME = "toe_model.safetensors"


class ToEError(ValueError):
    """A user-facing error: its message is one line that names the offending value and the fix."""


@dataclass
class ToEConfig:
    """One plug-in: a tree gate + expert bank + scale at each injection layer of one base model.

    Attributes:
        base_model: hub id or path of the base the plug-in was built for (informational; matching uses the hash).
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
    base_model: str = ""
    base_revision: str | None = None
    base_arch: dict[str, Any] = field(default_factory=dict)
    base_config_hash: str = ""
    teacher_model: str | None = None
    teacher_layers: list[int] | None = None
    bank_info: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        try:
            check_tree(self.shape, self.num_leaves)
        except ValueError as e:
            raise ToEError(str(e)) from None
        if self.selection not in SELECTIONS:
            raise ToEError(f"selection={self.selection!r} is unknown: use one of {SELECTIONS}")
        if self.selection == "beam" and self.shape != "balanced":
            raise ToEError("selection='beam' needs shape='balanced'; use selection='topp' for a deep tree")
        if not self.layers:
            raise ToEError("layers is empty: give at least one decoder layer index to inject into")
        if len(set(self.layers)) != len(self.layers) or any(layer < 0 for layer in self.layers):
            raise ToEError(f"layers={self.layers}: give distinct non-negative decoder layer indices")
        if self.teacher_layers is not None and len(self.teacher_layers) != len(self.layers):
            raise ToEError(
                f"teacher_layers={self.teacher_layers} has {len(self.teacher_layers)} entries but layers={self.layers} "
                f"has {len(self.layers)}: give one teacher layer per injection layer"
            )
        if not 1 <= self.top_k:
            raise ToEError(f"top_k={self.top_k}: must be >= 1")
        if not 0.0 < self.top_p <= 1.0:
            raise ToEError(f"top_p={self.top_p}: must be in (0, 1]")
        if self.clip <= 0:
            raise ToEError(f"clip={self.clip}: the norm clip κ must be > 0")
        if self.gate_rank < 1:
            raise ToEError(f"gate_rank={self.gate_rank}: must be >= 1")
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

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, directory: str | os.PathLike) -> None:
        from .io import atomic_write_text

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
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ToEError(f"{path} has unknown fields {unknown}: it was written by a newer tree-of-experts; upgrade")
        try:
            return cls(**data)
        except TypeError as e:
            raise ToEError(f"{path}: {e}; re-save the plug-in") from None
