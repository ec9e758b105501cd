"""The option groups of an extraction (`toe extract`, `toe rebuild`): the tree and bank it builds, what it captures,
the fusion maps it fits, and its disk budget."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import ExtractShape, Selection, Signal, check_routing
from ..errors import ToEError
from .base import OptionGroup, at_least, finite, learning_rate


@dataclass(frozen=True)
class Tree(OptionGroup):
    """The tree and bank an extraction (or a rebuild) builds from the expert signal, and how the plug-in it writes
    routes."""

    num_leaves: int = 64
    """N leaves of the tree (a power of two for a balanced tree)"""
    shape: ExtractShape = "balanced"
    """balanced (ToE-B: recursive 2-means) or deep (ToE-D: k-means, leaves ordered by mass)"""
    selection: Selection = "topk"
    """routing mode of the plug-in: dense, topk, topp or beam (beam needs a balanced tree)"""
    top_k: int = 4
    """K of the plug-in: leaves selected per token (the cap on adaptive K for topp, the beam width for beam)"""
    gate_rank: int = 64
    """r, the width of the gate trunk"""
    sample_rate: float = 1.0
    """share of the training tokens clustered, in (0, 1]"""
    max_rows: int = 200_000
    """cap on the tokens clustered (memory bound)"""
    signal: Signal = "fusion_map"
    """the expert signal the bank is built from: fusion_map (the trained map A(u, h)) or ridge (the untrained ridge
    step λ (P(u) - h), the O1 ridge oracle's edit)"""
    signal_lambda: float = 0.25
    """λ of the ridge step (with signal=ridge), in (0, 1]"""

    def check(self) -> None:
        check_routing(self.shape, self.num_leaves, self.selection, self.top_k)
        finite("signal_lambda", self.signal_lambda, 0.0, 1.0, " (the ridge step's share of P(u) - h)")
        if self.signal_lambda == 0:
            raise ToEError("signal_lambda=0 gives an all-zero bank: must be in (0, 1]")
        at_least("gate_rank", self.gate_rank, 1)
        finite("sample_rate", self.sample_rate, 0.0, 1.0, " (the share of training tokens clustered)")
        if self.sample_rate == 0:
            raise ToEError("sample_rate=0 clusters no tokens: must be in (0, 1]")
        at_least("max_rows", self.max_rows, 1, " (tokens clustered at most)")


@dataclass(frozen=True)
class Capture(OptionGroup):
    """What `toe extract` captures: which base and teacher layers are paired, from which model files (or from an
    earlier extraction's shards), and what each shard holds."""

    layers: list[int] | None = None
    """base injection layers, 0-based (default: the middle layer)"""
    teacher_layers: list[int] | None = None
    """teacher layer read for each injection layer (default: the same relative depth)"""
    shard_size: int = 64
    """examples per shard file"""
    topk_logprobs: int = 32
    """teacher top-k log-probs cached per token for distillation (0: none)"""
    reuse_capture: str | None = None
    """an extraction of the same models, data and capture settings at a layer set that includes every (layer,
    teacher layer) pair asked for: its shards give this one's states and the teacher is never loaded (the fusion
    maps and the tree are still built, for this layer set); with max_disk/state_tokens over one that kept every
    example's states, the budget samples it as a capture of its own would (a sweep over budgets from one capture);
    a budget over one that kept a sample only is refused"""
    teacher_gguf_file: str | None = None
    """load the teacher from this GGUF file inside the teacher folder"""
    base_gguf_file: str | None = None
    """load the base from this GGUF file inside the base folder"""

    def check(self) -> None:
        at_least("shard_size", self.shard_size, 1, " (examples per shard)")
        at_least("topk_logprobs", self.topk_logprobs, 0)

    def model_kwargs(self) -> tuple[dict, dict]:
        """The loaders' keyword arguments for the teacher and the base (their GGUF files)."""
        return ({"gguf_file": self.teacher_gguf_file} if self.teacher_gguf_file else {},
                {"gguf_file": self.base_gguf_file} if self.base_gguf_file else {})


@dataclass(frozen=True)
class Fusion(OptionGroup):
    """The maps `toe extract` fits on the captured states (a ridge map, then the trained fusion map A(u, h)), and the
    held-out examples that choose the ridge penalty and score them (the O1 CE table)."""

    heldout_frac: float = 0.1
    """share of the examples held out, in [0, 1)"""
    projector_epochs: int = 1
    """epochs of the trained fusion map over the corpus's training examples (under a state sample, --max_disk or
    --state_tokens, the same number of steps, cycling over the sampled examples: a budget bounds the disk, not the
    map's training)"""
    projector_lr: float = 1e-3
    """learning rate of the trained fusion map"""
    ridge_lambdas: tuple[float, ...] = (0.25, 0.5, 1.0)
    """interpolation weights λ of the untrained O1 injection λ (P(u) - h) reported in the O1 CE table"""

    def check(self) -> None:
        finite("heldout_frac", self.heldout_frac, 0.0, None)
        if self.heldout_frac >= 1:
            raise ToEError(f"heldout_frac={self.heldout_frac}: must be in [0, 1)")
        at_least("projector_epochs", self.projector_epochs, 0)
        learning_rate("projector_lr", self.projector_lr)
        for lam in self.ridge_lambdas:
            finite("ridge_lambdas", lam)


@dataclass(frozen=True)
class Disk(OptionGroup):
    """How much of its capture `toe extract` keeps on disk (docs/scale.md), and its plan."""

    max_disk: str | None = None
    """bound the folder's size (2GB, 500MB, 750KB: powers of 1000; GiB of 1024): every example keeps its light
    fields (ids, masks, top-k, the low state), and base/teacher states at every layer are kept for a sample of the
    examples that fits (held-out examples always, the rest chosen by the seed); everything that reads states reads
    the sample. A budget the light fields and the held-out states alone exceed is refused before any model loads,
    naming what fits"""
    state_tokens: int | None = None
    """keep full states for at most this many tokens (the sample's size; with max_disk, the smaller of the two);
    default: every example (unless max_disk says otherwise)"""
    cache_low_states: bool = True
    """under a sample, keep the base's state at the lowest injection layer for every example (what `toe train
    --cached_states` reads; 2 D_B bytes per token)"""
    dry_run: bool = False
    """print the plan (bytes per token, the sample, the disk total, a peak RAM estimate) without loading a model or
    writing anything"""

    def check(self) -> None:
        if self.state_tokens is not None and (isinstance(self.state_tokens, bool) or
                                              not isinstance(self.state_tokens, int) or self.state_tokens < 1):
            raise ToEError(f"state_tokens={self.state_tokens}: give at least 1 (tokens whose states are kept), or "
                           "leave it out")
        self.budget()  # a size that does not parse: one line now

    def budget(self) -> int | None:
        """``max_disk`` in bytes (None: no bound)."""
        from ..extraction.budget import parse_size

        return parse_size(self.max_disk) if self.max_disk is not None else None

    def sampled(self) -> bool:
        """Whether only a sample of the examples keeps its states (a disk budget or a token cap is given)."""
        return self.max_disk is not None or self.state_tokens is not None
