"""On-policy distillation (GKD, Agarwal et al. 2024): the student samples continuations of the training prompts,
the teacher scores every sampled token, and the loss is a generalized JSD between their next-token distributions on
the student's own text. It fixes the train/inference mismatch of training on teacher text only.

One implementation for every student: `toe train` (only the plug-in trains) and `toe baseline lora` (only the LoRA
weights train) both build their steps with :func:`step_batch`, :func:`scored_tail`, :func:`teacher_logits` and
:func:`objective_loss`, so a ToE-vs-LoRA comparison under this
objective is fair by construction. The teacher runs at training time only; inference stays at the base's cost.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields, replace

import torch

from ..errors import ToEError
from ..data import pad_left
from ..extraction.store import Extraction
from ..hf.layers import input_device, keep_index, padded_inputs
from ..folders import RESUMABLE_CHANGES
from ..losses import gathered_generalized_jsd, tail_positions, token_nll, topk_kl
from .examples import collate

OBJECTIVES = ("off_policy", "on_policy")


@dataclass
class OnPolicy:
    """How on-policy steps sample and score (recorded with the run).

    Attributes:
        ratio: share of steps that are on-policy (GKD's λ); the others train on the data's traces (CE + cached
            top-k KD). The choice per step is a function of (seed, step), so resume is exact.
        beta: generalized JSD interpolation: 0 = forward KL(teacher ‖ student), 1 = reverse KL(student ‖ teacher).
        max_new_tokens: sample length cap.
        temperature, top_p: the student's sampling (temperature 1, top_p 1 = its own distribution).
    """

    ratio: float = 1.0
    beta: float = 0.5
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio <= 1.0:
            raise ToEError(f"on_policy_ratio={self.ratio}: give the share of on-policy steps in [0, 1]")
        if not 0.0 <= self.beta <= 1.0:
            raise ToEError(f"beta={self.beta}: the generalized JSD's beta lies in [0, 1] (0 forward KL, 1 reverse)")
        if self.max_new_tokens < 1:
            raise ToEError(f"sample_max_new_tokens={self.max_new_tokens}: must be >= 1")
        if self.temperature <= 0:
            raise ToEError(f"sample_temperature={self.temperature}: must be > 0 (sampling, not greedy)")
        if not 0.0 < self.top_p <= 1.0:
            raise ToEError(f"sample_top_p={self.top_p}: must be in (0, 1]")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def of(cls, objective: str, ratio: float, beta: float, max_new_tokens: int, temperature: float,
           top_p: float) -> OnPolicy:
        """The on-policy settings of a run with ``objective`` (ratio 0 off-policy); refuses sampling options an
        off-policy run would ignore, naming them."""
        if objective not in OBJECTIVES:
            raise ToEError(f"objective={objective!r}: use one of {OBJECTIVES}")
        given = cls(ratio, beta, max_new_tokens, temperature, top_p)
        if objective == "on_policy":
            return given
        ignored = [f"--{OPTION_NAMES[f.name]}" for f in fields(cls) if getattr(given, f.name) != f.default]
        if ignored:
            raise ToEError(f"{', '.join(ignored)} set{'s' if len(ignored) == 1 else ''} on-policy training, but "
                           "--objective is off_policy: pass --objective on_policy, or drop "
                           f"{'it' if len(ignored) == 1 else 'them'}")
        return replace(given, ratio=0.0)


# The command-line options of OnPolicy's fields (`toe train`, `toe baseline`).
OPTION_NAMES = {"ratio": "on_policy_ratio", "beta": "beta", "max_new_tokens": "sample_max_new_tokens",
                "temperature": "sample_temperature", "top_p": "sample_top_p"}


def resume_ignores(objective: str) -> tuple[str, ...]:
    """The arguments ``--resume`` need not repeat besides io.RESUMABLE_CHANGES: an off-policy run's on-policy options
    never took effect (a run started before OnPolicy.of refused them may have saved some)."""
    return RESUMABLE_CHANGES + (tuple(OPTION_NAMES.values()) if objective != "on_policy" else ())


def is_on_policy(ratio: float, seed: int, step: int) -> bool:
    """Whether step ``step`` samples from the student: a draw seeded by (seed, step), so resume repeats it."""
    if ratio >= 1.0 or ratio <= 0.0:
        return ratio >= 1.0
    g = torch.Generator().manual_seed(seed * 1_000_003 + step + 7_919)
    return bool(torch.rand((), generator=g) < ratio)


def prompt_ids(ids: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """The prompt part of an encoded example (everything before its first target token)."""
    first = int(loss_mask.nonzero()[0]) if loss_mask.any() else len(ids)
    return ids[:first]


@torch.no_grad()
def sample(student: torch.nn.Module, prompts: list[torch.Tensor], pad_id: int, eos_ids: list[int],
           settings: OnPolicy, seed: int, device: torch.device | str) -> dict[str, torch.Tensor]:
    """The student's seeded continuations of ``prompts``.

    Returns a left-padded batch ``input_ids``/``attention_mask`` (B, T) of prompt + sample, where each sample ends
    at its first EOS (kept: the student learns when to stop) and ``loss_mask`` (B, T) is True on the sampled tokens.
    """
    ids, am = pad_left(prompts, pad_id)
    modes = [(m, m.training) for m in student.modules()]  # restored one by one (checkpointed layers included)
    student.eval()  # gradient checkpointing turns the KV cache off in train mode: sampling would be quadratic
    torch.manual_seed(seed)  # generate draws from the global generator
    out = student.generate(input_ids=ids.to(device), attention_mask=am.to(device), do_sample=True,
                           temperature=settings.temperature, top_p=settings.top_p, top_k=0,
                           repetition_penalty=1.0,  # the model's own distribution, not its generation_config's
                           max_new_tokens=settings.max_new_tokens, pad_token_id=pad_id, eos_token_id=eos_ids)
    for m, mode in modes:
        m.training = mode
    gen = out[:, ids.shape[1] :].cpu()  # (B, G)
    is_eos = torch.isin(gen, torch.tensor(eos_ids))
    keep = (is_eos.long().cumsum(1) - is_eos.long()) == 0  # up to and including the first EOS
    gen = torch.where(keep, gen, torch.full_like(gen, pad_id))
    return {"input_ids": torch.cat([ids, gen], 1), "attention_mask": torch.cat([am, keep.long()], 1),
            "loss_mask": torch.cat([torch.zeros_like(am, dtype=torch.bool), keep], 1)}


def onpolicy_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, loss_mask: torch.Tensor,
                        beta: float) -> torch.Tensor:
    """Per-token generalized JSD between student and teacher on the targets of ``loss_mask``.

    Args:
        student_logits, teacher_logits: (B, T, V) logits over the same T positions (position t predicts t + 1); a
            teacher vocabulary padded larger than the student's is cut to the student's.
        loss_mask: (B, T) bool, True on the target tokens (the sampled ones).
        beta: see :func:`tree_of_experts.losses.generalized_jsd`.

    Returns:
        (B, T) divergence placed at the target positions, 0 elsewhere (the convention of ``token_nll``).
    """
    rows, cols = loss_mask[:, 1:].to(student_logits.device).nonzero(as_tuple=True)  # position t scores target t+1
    out = torch.zeros(loss_mask.shape, dtype=torch.float32, device=student_logits.device)
    out[rows, cols + 1] = gathered_generalized_jsd(student_logits, teacher_logits, rows, cols, beta)  # (N,)
    return out


def step_batch(student: torch.nn.Module, examples: list, pad_id: int, stop_ids: list[int], settings: OnPolicy,
               on: bool, sample_seed: int, device: torch.device | str) -> dict[str, torch.Tensor]:
    """One step's batch: on-policy, the student's samples (seeded by ``sample_seed``) of the examples' prompts;
    off-policy, the examples' own text (and cached targets)."""
    if on:
        return sample(student, [prompt_ids(e.ids, e.loss_mask) for e in examples], pad_id, stop_ids, settings,
                      sample_seed, device)
    return collate(examples, pad_id)


def scored_tail(batch: dict[str, torch.Tensor], device: torch.device | str
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(keep, tail): the positions where a target is scored (the batch's tail, the only logits computed) and the
    batch's per-token fields over them, on ``device``."""
    keep = tail_positions(batch["loss_mask"], device)
    tail = {k: v[:, -len(keep) :].to(device) for k, v in batch.items()
            if k not in ("attention_mask", "states", "state_target", "state_norm2")}  # full-length fields
    return keep, tail


@torch.no_grad()
def teacher_logits(teacher: torch.nn.Module, batch: dict[str, torch.Tensor], keep: torch.Tensor) -> torch.Tensor:
    """The teacher's logits at the positions ``keep`` of a sampled batch, on the batch's device (a teacher spread
    over devices by --teacher_device_map returns them on its last one)."""
    dev = input_device(teacher)
    return teacher(**padded_inputs(batch["input_ids"], batch["attention_mask"], dev),
                   logits_to_keep=keep_index(teacher, keep, dev)).logits.to(batch["input_ids"].device)


def eos_ids(model: torch.nn.Module, tok) -> list[int]:
    """Every token that ends a sample: the tokenizer's EOS and the model's generation-config EOS ids (chat models
    end a turn with their own, e.g. Qwen's ``<|im_end|>``)."""
    gen = getattr(model, "generation_config", None)
    ids = getattr(gen, "eos_token_id", None)
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    return sorted({*ids, tok.eos_token_id} - {None})


def resolve_teacher(teacher: str | None, experts: str | None, base) -> str:
    """The frozen teacher of on-policy steps, checked before any model loads: ``teacher``, else the one the
    extraction in ``experts`` read. Refused when none is known, or when it is the base itself (a no-teacher
    control's extraction reads the base twice: a divergence to itself teaches nothing)."""
    if teacher is None and experts:
        teacher = Extraction(experts).teacher()
    if not teacher:
        where = f"the extraction {experts} names none" if experts else "no --experts extraction names one"
        raise ToEError(f"on-policy training needs the teacher: pass --teacher ({where})")
    if isinstance(base, str) and (teacher == base or (os.path.exists(teacher) and os.path.exists(base)
                                                      and os.path.samefile(teacher, base))):
        raise ToEError(f"the on-policy teacher {teacher} is the base itself (a no-teacher control's extraction names "
                       "the base as its teacher): pass --teacher with the large model")
    return teacher


def check_teacher_map(teacher_device_map: str | None, ratio: float, num_processes: int) -> None:
    """Refuses --teacher_device_map where it has no teacher to place (off-policy) or several processes would each
    spread a copy over the same devices."""
    if teacher_device_map and ratio == 0:
        raise ToEError("--teacher_device_map places the on-policy teacher: off-policy training runs none (its "
                       "top-k comes from the extraction): drop it")
    from ..hf.loading import check_one_process

    check_one_process(teacher_device_map, num_processes)


def load_teacher(teacher: str, tok, dtype: str, device, device_map=None) -> torch.nn.Module:
    """The frozen teacher of on-policy steps (see :func:`resolve_teacher`); its vocabulary must be the student's
    (the divergence compares distributions over the same token ids)."""

    from ..hf.loading import load_causal_lm, load_tokenizer

    t_tok = load_tokenizer(teacher)
    if t_tok.get_vocab() != tok.get_vocab():
        raise ToEError(f"teacher {teacher} has another vocabulary than the student: on-policy distillation compares "
                       "next-token distributions over shared ids; use a teacher with the student's tokenizer")
    model = load_causal_lm(teacher, dtype=dtype, device=str(device), device_map=device_map)
    return model.requires_grad_(False).eval()


def objective_loss(logits: torch.Tensor, tail: dict[str, torch.Tensor], n_tok: torch.Tensor,
                   t_logits: torch.Tensor | None, beta: float, ce_weight: float, kd_weight: float
                   ) -> tuple[torch.Tensor, dict[str, float | None]]:
    """The training objective of one batch, shared by `toe train` and the LoRA baseline.

    On-policy (``t_logits`` given: the teacher's logits on the student's samples): the generalized JSD on the
    sampled tokens. Off-policy: ``ce_weight`` · CE on the data's tokens + ``kd_weight`` · top-k KL to the teacher's
    cached log-probs where the batch carries them.

    Args:
        logits: (B, T, V) student logits over the batch's tail ``tail`` (``input_ids``, ``loss_mask`` and, when
            cached, ``topk_ids``/``topk_logp``/``kd_mask``, each (B, T, ...)).
        n_tok: the token count to normalise by (global across processes).

    Returns:
        (loss, parts): parts holds ``ce``, ``kd`` and ``jsd`` as floats (None where the step has no such term).
    """
    if t_logits is not None:
        jsd = onpolicy_divergence(logits, t_logits, tail["loss_mask"], beta).sum() / n_tok
        return jsd, {"ce": None, "kd": None, "jsd": jsd.item()}
    ce = token_nll(logits, tail["input_ids"], tail["loss_mask"]).sum() / n_tok
    loss, kd = ce_weight * ce, None
    if kd_weight > 0 and "topk_ids" in tail:
        kd_t = topk_kl(logits, tail["topk_ids"], tail["topk_logp"], tail["kd_mask"]).sum() / n_tok
        loss, kd = loss + kd_weight * kd_t, kd_t.item()
    return loss, {"ce": ce.item(), "kd": kd, "jsd": None}
