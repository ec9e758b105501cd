"""The option groups the commands share: typed, frozen dataclasses whose fields carry their own documentation.

A command takes each group as one parameter (``train(base, experts, data, out, loss=Loss(beta=0.3))``); the CLI
shows a group's fields as nested options (``--loss.beta 0.3``, from the field docstrings below), and YAML configs
nest them the same way (``loss: {beta: 0.3}``). Every option is declared once, here, with its choices as a
``Literal``; a value out of range is refused with one line (:class:`tree_of_experts.errors.ToEError`) when the
group is built. The flat spellings of earlier releases keep working: ``train(..., beta=0.3)`` in Python and
``--beta 0.3`` on the command line are routed to the group that declares the field (:func:`grouped`).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import typing
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Callable, Literal

from .config import MixedPrecision, Selection, _at_least, _finite, _literal_values, _lr, _optional_at_least
from .errors import ToEError

log = logging.getLogger(__name__)

DEFAULT_TEMPLATE = "Question: {prompt}\nAnswer: "
DType = Literal["float32", "float16", "bfloat16", "auto"]
Objective = Literal["off_policy", "on_policy"]


@dataclass(frozen=True)
class OptionGroup:
    """A group of options: Literal fields are checked against their choices, then :meth:`check` runs (every class
    of a group is a dataclass, so jsonargparse shows its fields as nested options)."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            allowed = _literal_values(hints[f.name])
            value = getattr(self, f.name)
            if allowed is not None and value not in allowed:
                choices = ", ".join(repr(v) for v in allowed if v is not None)
                raise ToEError(f"{f.name}={value!r} is unknown: use one of {choices}")
        self.check()

    def check(self) -> None:
        """Value checks beyond the Literal choices (ToEError with the fix)."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Text(OptionGroup):
    """Which rows of a data file are read, and how each becomes text."""

    prompt_field: str = "question"
    """record field holding the question (GSM8K: question, MATH: problem)"""
    response_field: str = "answer"
    """record field holding the response trained on (GSM8K: answer; `toe traces` output: trace)"""
    template: str = DEFAULT_TEMPLATE
    """prompt template with {prompt} where the question goes, or "chat" for the tokenizer's chat template"""
    strip_calc: bool = False
    """drop GSM8K's <<48/2=24>> calculator notes from responses"""
    max_length: int = 512
    """tokens kept per example (prompt + response + EOS); longer examples are cut"""
    limit: int | None = None
    """use the first `limit` rows of the data (default: all)"""
    skip_truncated: bool = False
    """leave out the rows whose prompt fills max_length (nothing of their response would be trained on; refused
    otherwise, with the max_length that keeps them) and count them in the summary"""

    def check(self) -> None:
        _at_least("max_length", self.max_length, 2, " (tokens per example)")
        _optional_at_least("limit", self.limit, 1, " (rows of --data)")

    def spec(self):
        """The :class:`tree_of_experts.data.DataSpec` of these options."""
        from .data import DataSpec

        return DataSpec(self.prompt_field, self.response_field, self.template, self.strip_calc)


@dataclass(frozen=True)
class Schedule(OptionGroup):
    """How long a training run is, in what order it sees the data, and how often it records and saves."""

    max_steps: int = 200
    """optimisation steps (Stage B + C of a plug-in; every step of an adapter)"""
    batch_size: int = 8
    """global batch of sequences per step (split across processes)"""
    seed: int = 0
    """seed of every random choice (data order, on-policy steps, sampling, initialisation)"""
    log_every: int = 10
    """steps between rows of out/metrics.jsonl"""
    save_every: int = 50
    """steps between checkpoints in out/checkpoint (one is also saved at the end of each stage)"""
    snapshot_every: int = 0
    """also keep the trained weights every this many steps as out/snapshots/step-N (learning curves score them);
    0: none"""

    def check(self) -> None:
        _at_least("max_steps", self.max_steps, 1)
        _at_least("batch_size", self.batch_size, 1, " (sequences per step)")
        _at_least("log_every", self.log_every, 1)
        _at_least("save_every", self.save_every, 1)
        _at_least("snapshot_every", self.snapshot_every, 0)


@dataclass(frozen=True)
class Loss(OptionGroup):
    """What a training step minimises: off-policy CE (+ the teacher's cached top-k KL, + the state loss), or
    on-policy GKD against the live teacher on the student's own samples."""

    objective: Objective = "off_policy"
    """off_policy trains on the data's traces (CE + the teacher's cached top-k KL); on_policy makes
    on_policy_ratio of the steps on-policy (GKD): the student samples continuations of the batch's prompts and
    the loss is the generalized JSD (beta) to the live teacher's distributions on those samples"""
    teacher: str | None = None
    """the teacher for on-policy steps (default: the one the extraction read, from its manifest)"""
    on_policy_ratio: float = 1.0
    """share of the steps that are on-policy with objective=on_policy (GKD's lambda, in [0, 1])"""
    beta: float = 0.5
    """GKD's beta, the generalized JSD of on-policy steps: 0 forward KL, 1 reverse KL, 0.5 the symmetric JSD"""
    sample_max_new_tokens: int = 256
    """length cap, in tokens, of each continuation the student samples on-policy"""
    sample_temperature: float = 1.0
    """temperature of the student's on-policy sampling (1: its own distribution)"""
    sample_top_p: float = 1.0
    """nucleus mass of the student's on-policy sampling (1: no truncation)"""
    ce_weight: float = 1.0
    """weight of the next-token CE on the data (0: train on the teacher's distribution alone)"""
    kd_weight: float | None = None
    """weight of the top-k KL to the teacher's cached log-probs on off-policy steps (default: 1.0 for a plug-in,
    0 for LoRA and SFT, the CE-only adapters of the earlier studies)"""
    no_kd: bool = False
    """turn distillation of the cached top-k off"""
    state_loss_weight: float = 0.0
    """weight of the state loss on off-policy steps: the relative squared error between the base's states at the
    injection layers and h0 + delta from the extraction's cache (1 when the model changes nothing, 0 when it adds
    exactly delta; tree_of_experts.losses.state_loss); 0: off"""

    def check(self) -> None:
        self.on_policy()  # its own range checks
        for name in ("ce_weight", "kd_weight", "state_loss_weight"):
            if getattr(self, name) is not None:
                _finite(name, getattr(self, name), 0.0, None, " (a loss weight)")

    def on_policy(self):
        """The :class:`tree_of_experts.training.distill.OnPolicy` of these options (ratio 0 when off-policy)."""
        from .training.distill import OnPolicy

        return OnPolicy.of(self.objective, self.on_policy_ratio, self.beta, self.sample_max_new_tokens,
                           self.sample_temperature, self.sample_top_p)

    def kd(self, default: float) -> float:
        """The cached top-k KL's weight: 0 with ``no_kd``, else ``kd_weight`` or the trained system's default."""
        return 0.0 if self.no_kd else (default if self.kd_weight is None else self.kd_weight)


@dataclass(frozen=True)
class Fit(OptionGroup):
    """How a plug-in trains: learning rates, the route warm-up (Stage A), the route and usage terms, routing while
    training. (Adapters read only ``lr``.)"""

    lr: float | None = None
    """learning rate (default: 1e-3 for the gates of a plug-in, 2e-4 for LoRA, 1e-5 for SFT)"""
    scale_lr: float = 1e-2
    """learning rate of a plug-in's per-channel scales s"""
    bank_lr: float = 1e-4
    """learning rate of the expert bank (unused with freeze_bank)"""
    stage_a_lr: float = 1e-2
    """learning rate of the gates in Stage A (the route warm-up)"""
    scale_init: float = 1.0
    """where the scales of a fresh plug-in (all zero: an exact no-op, as `toe extract` saves it) start: 1 injects
    the bank at its extracted size, 0 starts from the no-op; scales that are not all zero are kept"""
    stage_a_steps: int = 100
    """route warm-up steps on cached base states (0: none)"""
    skip_stage_a: bool = False
    """no route warm-up"""
    route_batch_size: int = 512
    """cached states per Stage-A step"""
    route_weight: float = 0.1
    """initial weight of the route loss in Stage B, decaying linearly to 0"""
    usage_weight: float = 0.01
    """weight of the usage regulariser (log N - entropy of leaf usage)"""
    freeze_bank: bool = False
    """keep the bank at its extracted vectors (only the gates and the scales train)"""
    train_selection: Selection = "dense"
    """routing in Stage B: dense (every leaf gets gradient), topk, topp or beam"""
    anneal_steps: int = 0
    """Stage C: the last anneal_steps steps route with the plug-in's own selection (top-K)"""
    query_norm: bool | None = None
    """switch the gates' query normalisation on or off (None keeps the plug-in's); adds no parameters"""
    cached_states: bool = False
    """off-policy steps start from the extraction's cached base states at the lowest injection layer instead of
    running the frozen layers below it (needs the extraction's own data file)"""

    def check(self) -> None:
        for name in ("lr", "scale_lr", "bank_lr", "stage_a_lr"):
            if getattr(self, name) is not None:
                _lr(name, getattr(self, name))
        _finite("scale_init", self.scale_init)
        for name in ("route_weight", "usage_weight"):
            _finite(name, getattr(self, name), 0.0, None, " (a loss weight)")
        _at_least("stage_a_steps", self.stage_a_steps, 0)
        _at_least("route_batch_size", self.route_batch_size, 1)
        _at_least("anneal_steps", self.anneal_steps, 0)


@dataclass(frozen=True)
class Runtime(OptionGroup):
    """Where and how a command runs, and what it may do to its output folder."""

    dtype: DType = "float32"
    """dtype of the frozen models: float32, float16, bfloat16 or auto (as stored)"""
    mixed_precision: MixedPrecision = "no"
    """accelerate's autocast in training steps: no, fp16 or bf16"""
    gradient_checkpointing: bool = False
    """recompute the frozen layers' activations in backward (the same gradients in less memory)"""
    resume: bool = False
    """continue from out/checkpoint (with the arguments the run was started with)"""
    overwrite: bool = False
    """replace what another run left in the output folder (refused otherwise)"""
    report_to: str | None = None
    """log every metrics row to accelerate's trackers as well (tensorboard, wandb, mlflow, all...; default: only
    metrics.jsonl and curves.png); local trackers write to out/trackers"""


GROUPS = (Text, Schedule, Loss, Fit, Runtime)


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


def unused(what: str, group: OptionGroup, names: Iterable[str], why: str) -> list[str]:
    """Warns (one line) about the options of ``group`` in ``names`` that ``what`` does not read but were set away
    from their defaults: a value the user gave is never silently ignored. Returns their names."""
    defaults = type(group)()
    given = [n for n in names if getattr(group, n) != getattr(defaults, n)]
    if given:
        log.warning("%s: %s %s no effect (%s)", what, ", ".join(f"--{n}" for n in given),
                    "has" if len(given) == 1 else "have", why)
    return given


def require(fn_name: str, group: OptionGroup, unused: dict[str, str]) -> None:
    """Refuses options of ``group`` that ``fn_name`` does not read when set away from their defaults ({field:
    why}), where running without them would mislead (a value the user gave is never silently ignored)."""
    defaults = type(group)()
    for name, why in unused.items():
        if getattr(group, name) != getattr(defaults, name):
            raise ToEError(f"{fn_name}: --{name} has no effect here ({why}): drop it")
