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

from .config import (
    CETarget,
    ExtractShape,
    MixedPrecision,
    Selection,
    Signal,
    Task,
    _at_least,
    _finite,
    _literal_values,
    _lr,
    _optional_at_least,
    check_routing,
)
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
    device: str | None = None
    """where the models run: cpu, cuda, cuda:1, ... (default: the GPU when one is visible, else the CPU; under
    `accelerate launch`, each process's own device)"""


ACCELERATE_PLACES = "accelerate places the models, one device per process: `accelerate launch`, or CUDA_VISIBLE_DEVICES"
TRAINING_ONLY = {"mixed_precision": "it is training's autocast", "gradient_checkpointing": "it saves training memory",
                 "report_to": "it logs training metrics"}  # the Runtime fields only the training commands read


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
        _finite("signal_lambda", self.signal_lambda, 0.0, 1.0, " (the ridge step's share of P(u) - h)")
        if self.signal_lambda == 0:
            raise ToEError("signal_lambda=0 gives an all-zero bank: must be in (0, 1]")
        _at_least("gate_rank", self.gate_rank, 1)
        _finite("sample_rate", self.sample_rate, 0.0, 1.0, " (the share of training tokens clustered)")
        if self.sample_rate == 0:
            raise ToEError("sample_rate=0 clusters no tokens: must be in (0, 1]")
        _at_least("max_rows", self.max_rows, 1, " (tokens clustered at most)")


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
    maps and the tree are still built, for this layer set)"""
    teacher_gguf_file: str | None = None
    """load the teacher from this GGUF file inside the teacher folder"""
    base_gguf_file: str | None = None
    """load the base from this GGUF file inside the base folder"""

    def check(self) -> None:
        _at_least("shard_size", self.shard_size, 1, " (examples per shard)")
        _at_least("topk_logprobs", self.topk_logprobs, 0)

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
    """epochs of the trained fusion map"""
    projector_lr: float = 1e-3
    """learning rate of the trained fusion map"""
    ridge_lambdas: tuple[float, ...] = (0.25, 0.5, 1.0)
    """interpolation weights λ of the untrained O1 injection λ (P(u) - h) reported in the O1 CE table"""

    def check(self) -> None:
        _finite("heldout_frac", self.heldout_frac, 0.0, None)
        if self.heldout_frac >= 1:
            raise ToEError(f"heldout_frac={self.heldout_frac}: must be in [0, 1)")
        _at_least("projector_epochs", self.projector_epochs, 0)
        _lr("projector_lr", self.projector_lr)
        for lam in self.ridge_lambdas:
            _finite("ridge_lambdas", lam)


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
        from .extraction.budget import parse_size

        return parse_size(self.max_disk) if self.max_disk is not None else None

    def sampled(self) -> bool:
        """Whether only a sample of the examples keeps its states (a disk budget or a token cap is given)."""
        return self.max_disk is not None or self.state_tokens is not None


@dataclass(frozen=True)
class Systems(OptionGroup):
    """The systems scored beside the base and the teacher: a plug-in and how it routes, the adapters of `toe
    baseline`, the bare base itself, and the oracle rows of `toe oracle`."""

    plugin: str | None = None
    """a ToE plug-in folder on the base, scored as system toe (`toe oracle`: the "ToE (learned)" row)"""
    lora: str | None = None
    """a peft adapter folder on the base (`toe baseline --kind lora`), scored as system lora"""
    sft: str | None = None
    """a fully fine-tuned copy of the base (`toe baseline --kind sft`), scored as system sft"""
    with_base: bool = True
    """also score the bare base (off: a folder holding only the plug-in/LoRA/teacher rows, to be pooled by `toe
    report` with a folder that has the base on the same items)"""
    plugin_selection: Selection | None = None
    """route the plug-in with this mode (dense, topk, topp, beam) instead of its configured one"""
    plugin_top_k: int | None = None
    """route the plug-in with this K (an inference-time sweep: nothing is retrained; recorded in the metrics' args
    as routing)"""
    plugin_top_p: float | None = None
    """route the plug-in with this top-p mass"""
    lambdas: tuple[float, ...] = (0.25, 0.5, 1.0)
    """`toe oracle`: the λ values of its ridge O1 rows λ (P(u) - h)"""
    predict: bool = True
    """`toe oracle`: also fit δ̂(h) (ridge and MLP) on the extraction's training tokens, report its held-out R² per
    layer and score CE with δ̂(h) injected in place of δ (the ceiling of any teacher-free gate)"""
    ceiling_only: bool = False
    """`toe oracle`: score only the rows that place that ceiling (base, teacher, O1 trained map, static vector, the
    predicted rows, ToE): no ridge-λ sweep, no O2, no per-layer rows"""
    generate: bool = False
    """`toe oracle`: also answer the items greedily (base, teacher, ToE, the live O1 trained map) and grade them"""

    def check(self) -> None:
        _optional_at_least("plugin_top_k", self.plugin_top_k, 1)
        if self.plugin_top_p is not None:
            _finite("plugin_top_p", self.plugin_top_p, 0.0, 1.0)
            if self.plugin_top_p == 0:
                raise ToEError("plugin_top_p=0 keeps no leaf: must be in (0, 1]")
        for lam in self.lambdas:
            _finite("lambdas", lam)

    def routing(self) -> dict:
        """The plug-in's routing overrides, as the metrics record them (None: the plug-in's own)."""
        return {"selection": self.plugin_selection, "top_k": self.plugin_top_k, "top_p": self.plugin_top_p}


ORACLE_ROWS = ("lambdas", "predict", "ceiling_only", "generate")  # the Systems fields only `toe oracle` reads


@dataclass(frozen=True)
class Scoring(OptionGroup):
    """What each system is asked and how it is scored: the task's items and prompts, what CE is scored on, and the
    generation that accuracy grades."""

    task: Task = "gsm8k"
    """gsm8k, math (which fields hold question and solution, and how answers are graded) or code (CE only: prompt/
    text rows, e.g. held-out source files)"""
    skip: int = 0
    """rows of the data left out first (keeps a tuning slice out of reported numbers)"""
    few_shot: int = 0
    """number of solved examples prepended to each prompt, taken from few_shot_data"""
    few_shot_data: str | None = None
    """data file of solved examples for few_shot (e.g. the train file; its first rows are used)"""
    ce_target: CETarget = "gold_clean"
    """what CE is scored on: gold_clean (the solution without <<...>> notes), gold (as written) or trace (the trace
    field written by `toe traces`: the teacher's own completions, where its CE is the natural floor)"""
    ce: bool = True
    """score the teacher-forced CE of each system on the ce_target text"""
    accuracy: bool = True
    """generate each system's answers and grade them"""
    skip_bad_rows: bool = False
    """leave out data rows that cannot be used (not an object, a missing, non-text or empty field, no gold answer to
    grade, ...) and record how many as skipped_rows, instead of stopping at the first with its file:line"""
    max_new_tokens: int = 256
    """generation budget per item, in tokens"""
    temperature: float = 0.0
    """decoding temperature; 0 is greedy, a positive one samples"""
    top_p: float = 1.0
    """nucleus mass when sampling (not to be confused with plugin_top_p, which routes the plug-in)"""
    num_samples: int = 1
    """sampled completions per item (k): metrics gain maj@k, pass@k and pass@1 (mean over all samples); every
    sample is in the per-example JSONL, and the row's own answer is its first sample's"""

    def check(self) -> None:
        _at_least("skip", self.skip, 0)
        _at_least("few_shot", self.few_shot, 0)
        _at_least("max_new_tokens", self.max_new_tokens, 1)
        self.sampling(0)  # its own checks

    def sampling(self, seed: int):
        """The :class:`tree_of_experts.inference.Sampling` of these options."""
        from .inference import Sampling

        return Sampling(self.temperature, self.top_p, self.num_samples, seed)


SAMPLING = ("temperature", "top_p", "num_samples")  # the Scoring fields of sampled decoding


@dataclass(frozen=True)
class Prompts(OptionGroup):
    """What `toe generate` completes, and in which format."""

    prompt: str | None = None
    """one prompt, as given (a shell passes "\\n" as two characters: write $'...\\n...' for a newline)"""
    prompts_file: str | None = None
    """a text file with one prompt per line (as written: a multi-line prompt goes in a data file), or a data file
    (.jsonl, .json, .csv, .parquet) with a "prompt" field"""
    chat: bool = False
    """wrap each prompt in the tokenizer's chat template"""


@dataclass(frozen=True)
class Workload(OptionGroup):
    """The workloads `toe bench` times, and how it runs them."""

    batches: list[int] | None = None
    """batch sizes of the generation timings (default 1 and 8)"""
    prompt_len: int = 64
    """prompt tokens of the generation and on-policy workloads"""
    new_tokens: int = 32
    """tokens decoded per generation run and sampled per on-policy step"""
    reps: int = 5
    """interleaved repetitions of each generation, training and extraction timing"""
    extract_batch: int = 4
    """sequences per timed extraction forward (with a teacher)"""
    extract_length: int = 128
    """tokens per sequence of the timed extraction forward"""
    train_batch: int = 4
    """sequences per timed `toe train` step (timed against a frozen-base forward + backward) and per on-policy
    step"""
    train_length: int = 128
    """tokens per sequence of the timed train step"""
    lora_rank: int = 8
    """also time a `toe baseline --kind lora` step of this rank on the same tokens (0: don't)"""
    compile: bool = False
    """time the plug-in with its hook computation compiled (ToEPlugin.compile), compiled before the timed
    repetitions"""
    threads: int | None = None
    """torch CPU threads (default: torch's choice)"""

    def check(self) -> None:
        for name in ("prompt_len", "new_tokens", "reps", "extract_batch", "extract_length", "train_batch",
                     "train_length"):
            _at_least(name, getattr(self, name), 1)
        _at_least("lora_rank", self.lora_rank, 0)
        _optional_at_least("threads", self.threads, 1)
        for b in self.batches or ():
            _at_least("batches", b, 1, " (a batch size)")


@dataclass(frozen=True)
class Sweeps(OptionGroup):
    """The leaf counts `toe bench` times routing and the bank at."""

    routing_exponents: list[int] | None = None
    """N = 2^e leaves to time routing at (default 6, 8, 10, 12, 14, 16, 18, 20)"""
    routing_tokens: int = 64
    """tokens per routing call"""
    routing_reps: int = 5
    """repetitions of each routing timing"""
    bank_exponents: list[int] | None = None
    """N = 2^e leaves of the bank_scale part (default 10, 12, 14, 16, 18, 20)"""

    def check(self) -> None:
        _at_least("routing_tokens", self.routing_tokens, 1)
        _at_least("routing_reps", self.routing_reps, 1)


@dataclass(frozen=True)
class Pipeline(OptionGroup):
    """The demo's own settings: the size of its generated toy data, its training length and the no-teacher
    control."""

    n_train: int = 384
    """rows of generated toy training data"""
    n_dev: int = 128
    """rows of generated toy evaluation data"""
    train_steps: int = 1000
    """`toe train` Stage B steps (the same for the control)"""
    control: bool = True
    """also run the no-teacher control: the identical pipeline with the base's own states and no distillation"""

    def check(self) -> None:
        _at_least("n_train", self.n_train, 1)
        _at_least("n_dev", self.n_dev, 1)
        _at_least("train_steps", self.train_steps, 1)


GROUPS = (Text, Schedule, Loss, Fit, Runtime, Tree, Capture, Fusion, Disk, Systems, Scoring, Prompts, Workload,
          Sweeps, Pipeline)


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


def refuse_unused(fn_name: str, group: OptionGroup, used: typing.Iterable[str], why: str | dict[str, str]) -> None:
    """:func:`require` for every field of ``group`` but ``used``: ``why`` says why they have no effect here (one
    reason for all, or {field: reason} with ``why[""]`` for the rest)."""
    reasons = why if isinstance(why, dict) else {}
    rest = why if isinstance(why, str) else why.get("", "not read here")
    require(fn_name, group, {f.name: reasons.get(f.name, rest) for f in dataclasses.fields(group)
                             if f.name not in set(used)})
