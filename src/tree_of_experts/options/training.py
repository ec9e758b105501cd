"""The option groups of training (`toe train`, `toe baseline`): the text, the schedule, the loss, how a plug-in fits,
and where it runs."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import MixedPrecision, Selection
from .base import DEFAULT_TEMPLATE, DType, Objective, OptionGroup, at_least, finite, learning_rate, optional_at_least


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
        at_least("max_length", self.max_length, 2, " (tokens per example)")
        optional_at_least("limit", self.limit, 1, " (rows of --data)")

    def spec(self):
        """The :class:`tree_of_experts.data.DataSpec` of these options."""
        from ..data import DataSpec

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
        at_least("max_steps", self.max_steps, 1)
        at_least("batch_size", self.batch_size, 1, " (sequences per step)")
        at_least("log_every", self.log_every, 1)
        at_least("save_every", self.save_every, 1)
        at_least("snapshot_every", self.snapshot_every, 0)


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
                finite(name, getattr(self, name), 0.0, None, " (a loss weight)")

    def on_policy(self):
        """The :class:`tree_of_experts.training.distill.OnPolicy` of these options (ratio 0 when off-policy)."""
        from ..training.distill import OnPolicy

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
                learning_rate(name, getattr(self, name))
        finite("scale_init", self.scale_init)
        for name in ("route_weight", "usage_weight"):
            finite(name, getattr(self, name), 0.0, None, " (a loss weight)")
        at_least("stage_a_steps", self.stage_a_steps, 0)
        at_least("route_batch_size", self.route_batch_size, 1)
        at_least("anneal_steps", self.anneal_steps, 0)


@dataclass(frozen=True)
class Runtime(OptionGroup):
    """Where and how a command runs, and what it may do to its output folder."""

    dtype: DType = "float32"
    """dtype of the frozen models: float32, float16, bfloat16 or auto (as stored)"""
    mixed_precision: MixedPrecision = "no"
    """accelerate's autocast in training steps: no, fp16 or bf16"""
    gradient_checkpointing: bool = False
    """recompute the frozen layers' activations in backward (the same gradients in less memory)"""
    gradient_accumulation_steps: int = 1
    """run each step's batch as this many micro-batches, adding their gradients before the one optimizer step,
    with one micro-batch's activations and logits in memory: the same gradients, but for a plug-in's usage-balance
    term, which each micro-batch takes over its own tokens; must divide each process's share of batch_size, and a
    resumed run keeps it"""
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
    teacher_device_map: str | None = None
    """the teacher over several devices, for a teacher too large for one: auto, balanced, balanced_low_0 or
    sequential (accelerate fills the GPUs, then the CPU, then the disk) or a JSON file {module name: device}; read by
    extract, traces, on-policy train/baseline and eval's teacher row (one process only; not by oracle, which runs
    the teacher token by token beside the base)"""

    def check(self) -> None:
        at_least("gradient_accumulation_steps", self.gradient_accumulation_steps, 1, " (micro-batches per step)")
        self.teacher_map()

    def teacher_map(self):
        """``teacher_device_map`` as transformers' ``device_map`` (None: the teacher goes to ``device``)."""
        from ..hf.loading import parse_device_map

        return parse_device_map(self.teacher_device_map)


ACCELERATE_PLACES = "accelerate places the models, one device per process: `accelerate launch`, or CUDA_VISIBLE_DEVICES"


TRAINING_ONLY = {"mixed_precision": "it is training's autocast", "gradient_checkpointing": "it saves training memory",
                 "gradient_accumulation_steps": "it splits training steps",
                 "report_to": "it logs training metrics"}  # the Runtime fields only the training commands read
