"""The option groups of scoring and the other commands: which systems `toe eval` / `toe oracle` score and how,
`toe generate`'s prompts, `toe bench`'s workload and sweeps, and the demo's pipeline."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import CETarget, Selection, Task
from ..errors import ToEError
from .base import OptionGroup, at_least, finite, optional_at_least


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
        optional_at_least("plugin_top_k", self.plugin_top_k, 1)
        if self.plugin_top_p is not None:
            finite("plugin_top_p", self.plugin_top_p, 0.0, 1.0)
            if self.plugin_top_p == 0:
                raise ToEError("plugin_top_p=0 keeps no leaf: must be in (0, 1]")
        for lam in self.lambdas:
            finite("lambdas", lam)

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
        at_least("skip", self.skip, 0)
        at_least("few_shot", self.few_shot, 0)
        at_least("max_new_tokens", self.max_new_tokens, 1)
        self.sampling(0)  # its own checks

    def sampling(self, seed: int):
        """The :class:`tree_of_experts.inference.Sampling` of these options."""
        from ..inference import Sampling

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
            at_least(name, getattr(self, name), 1)
        at_least("lora_rank", self.lora_rank, 0)
        optional_at_least("threads", self.threads, 1)
        for b in self.batches or ():
            at_least("batches", b, 1, " (a batch size)")


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
        at_least("routing_tokens", self.routing_tokens, 1)
        at_least("routing_reps", self.routing_reps, 1)


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
        at_least("n_train", self.n_train, 1)
        at_least("n_dev", self.n_dev, 1)
        at_least("train_steps", self.train_steps, 1)
