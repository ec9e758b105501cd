"""Token-level losses shared by extraction, training and evaluation."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def tail_length(loss_mask: torch.Tensor) -> int:
    """How many trailing positions of a left-padded batch need logits: every target and the position before the
    first one (position t predicts t + 1). Pass :func:`tail_positions` as ``logits_to_keep`` and score the same tail
    of the batch: prompt and padding positions then cost no vocabulary projection (152k columns for Qwen2.5)."""
    cols = loss_mask.any(0).nonzero()
    return min(int(loss_mask.shape[1] - cols[0]) + 1, loss_mask.shape[1]) if len(cols) else 1


def tail_positions(loss_mask: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """The last :func:`tail_length` positions as an index tensor: transformers gathers them into a contiguous copy
    (an int ``logits_to_keep`` slices a strided view, which CPU bf16 matmuls run ~4x slower than the whole batch)."""
    t = loss_mask.shape[1]
    return torch.arange(t - tail_length(loss_mask), t, device=device)


def token_nll(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Per-token negative log-likelihood of each next token.

    Args:
        logits: (B, T, V); position t predicts token t + 1.
        input_ids: (B, T).
        loss_mask: (B, T) bool, True on the tokens to score (as targets).

    Returns:
        (B, T) float32 NLL placed at the target positions, 0 elsewhere (position 0 is never a target).
    """
    nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), input_ids[:, 1:], reduction="none")  # (B, T-1)
    nll = F.pad(nll, (1, 0))
    return nll * loss_mask


def topk_kl(
    logits: torch.Tensor, topk_ids: torch.Tensor, topk_logp: torch.Tensor, loss_mask: torch.Tensor
) -> torch.Tensor:
    """KL(teacher || student) restricted to the teacher's top-k tokens, renormalised on both sides.

    Args:
        logits: (B, T, V) student logits; position t predicts token t + 1.
        topk_ids, topk_logp: (B, T, k) teacher's top-k next-token ids and log-probs, stored at the *target*
            position t + 1 (the same convention as :func:`token_nll`).
        loss_mask: (B, T) targets that count.

    Returns:
        (B, T) KL at the counted targets, 0 elsewhere (sum and divide by the token count you normalise by).
    """
    # Renormalising over the top-k makes the student's log-partition cancel: gather k logits per position, never
    # a (B, T, V) log-softmax (that tensor is 0.9 GB for 4 x 384 tokens of a 152k vocabulary).
    s = logits[:, :-1].gather(-1, topk_ids[:, 1:].long()).float()  # (B, T-1, k): position t scores target t + 1
    s = F.pad(s, (0, 0, 1, 0))
    s = s - s.logsumexp(-1, keepdim=True)
    t = topk_logp.float() - topk_logp.float().logsumexp(-1, keepdim=True)
    kl = (t.exp() * (t - s)).sum(-1)  # (B, T)
    return kl * loss_mask


def topk_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor, k: int):
    """The teacher side of :func:`topk_kl` and its own NLL, from one pass over the vocabulary.

    Returns:
        nll: (B, T) as :func:`token_nll`; top_ids, top_logp: (B, T - 1, k) top-k next-token ids and log-probs at
        each predicting position t (for target t + 1).
    """
    lse = logits[:, :-1].float().logsumexp(-1)  # (B, T-1)
    target = logits[:, :-1].gather(-1, input_ids[:, 1:, None]).squeeze(-1).float()
    nll = F.pad(lse - target, (1, 0)) * loss_mask
    top = logits[:, :-1].topk(k, dim=-1)
    return nll, top.indices, top.values.float() - lse[..., None]


def generalized_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float) -> torch.Tensor:
    """Generalized Jensen-Shannon divergence between next-token distributions, per position (GKD, Agarwal et al.
    2024; the same convention as trl's ``GKDTrainer``).

    ``JSD_β(T ‖ S) = β KL(T ‖ M) + (1 − β) KL(S ‖ M)`` with the mixture ``M = β T + (1 − β) S``. The mixture form
    vanishes at the ends, so ``beta=0`` is taken as the forward ``KL(T ‖ S)`` and ``beta=1`` as the reverse
    ``KL(S ‖ T)``, as trl does.

    Args:
        student_logits, teacher_logits: (N, V) logits at the same N positions (the teacher's vocabulary cut to the
            student's if it is padded larger).
        beta: interpolation in [0, 1].

    Returns:
        (N,) float32 divergence per position.
    """
    s = F.log_softmax(student_logits.float(), dim=-1)
    t = F.log_softmax(teacher_logits.float(), dim=-1)
    if beta == 0.0:
        return (t.exp() * (t - s)).sum(-1)
    if beta == 1.0:
        return (s.exp() * (s - t)).sum(-1)
    m = torch.logsumexp(torch.stack([s + math.log(1 - beta), t + math.log(beta)]), dim=0)
    return beta * (t.exp() * (t - m)).sum(-1) + (1 - beta) * (s.exp() * (s - m)).sum(-1)


class _GatheredJSD(torch.autograd.Function):
    """:func:`generalized_jsd` at gathered positions of (B, T, V) logits, ``chunk`` positions at a time.

    The divergence's (N, V) intermediates (two log-softmaxes, the mixture, their products) are what an on-policy
    step over a 152k vocabulary runs out of memory on: several GB each at a few hundred sampled tokens, all kept for
    the backward. Here the forward keeps nothing but its inputs, and the backward recomputes one chunk at a time
    and writes its gradient into the student's rows: peak memory is the student's logits, their gradient, the
    teacher's logits and one chunk."""

    @staticmethod
    def forward(ctx, student, teacher, rows, cols, beta, chunk):
        v = student.shape[-1]
        out = torch.empty(len(rows), dtype=torch.float32, device=student.device)
        for i in range(0, len(rows), chunk):
            r, c = rows[i : i + chunk], cols[i : i + chunk]
            out[i : i + chunk] = generalized_jsd(student[r, c], _rows(teacher, r, c, v, student.device), beta)
        ctx.save_for_backward(student, teacher, rows, cols)
        ctx.beta, ctx.chunk = beta, chunk
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable  # the recomputed chunks keep no graph: no second derivative
    def backward(ctx, grad):
        student, teacher, rows, cols = ctx.saved_tensors
        v = student.shape[-1]
        g = torch.zeros_like(student)
        for i in range(0, len(rows), ctx.chunk):
            r, c = rows[i : i + ctx.chunk], cols[i : i + ctx.chunk]
            with torch.enable_grad():
                z = student[r, c].detach().requires_grad_()
                d = generalized_jsd(z, _rows(teacher, r, c, v, student.device), ctx.beta)
                (gz,) = torch.autograd.grad(d, z, grad[i : i + ctx.chunk])
            g.index_put_((r, c), gz.to(g.dtype), accumulate=True)  # a position listed twice counts twice
        return g, None, None, None, None, None


def _rows(teacher: torch.Tensor, r: torch.Tensor, c: torch.Tensor, v: int, device) -> torch.Tensor:
    """The teacher's logits at positions (r, c), cut to the student's vocabulary, on ``device``."""
    return teacher[r.to(teacher.device), c.to(teacher.device), :v].to(device)


def gathered_generalized_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, rows: torch.Tensor,
                             cols: torch.Tensor, beta: float, chunk: int = 128) -> torch.Tensor:
    """:func:`generalized_jsd` between ``student_logits[rows, cols]`` and ``teacher_logits[rows, cols]`` in bounded
    memory: the same values and gradient, computed ``chunk`` positions at a time.

    Args:
        student_logits: (B, T, V) logits with grad.
        teacher_logits: (B, T, V_T) with V_T >= V (cut to the student's vocabulary), on any device.
        rows, cols: (N,) positions to score.
        beta: see :func:`generalized_jsd`.
        chunk: positions per chunk (each chunk holds a few (chunk, V) float32 tensors).

    Returns:
        (N,) float32 divergence per position.
    """
    return _GatheredJSD.apply(student_logits, teacher_logits, rows, cols, beta, chunk)


def state_loss(states: list[torch.Tensor], target: torch.Tensor, norm2: torch.Tensor,
               total: torch.Tensor | None = None) -> torch.Tensor:
    """Relative squared error between the trained system's states at the injection layers and where the teacher's
    signal puts them: Σ_j Σ_t ‖h_j,t − (h⁰_j,t + δ_j,t)‖² / Σ_j Σ_t ‖δ_j,t‖², over the tokens with a target.

    h⁰ is the frozen base's state (the extraction's cache) and δ the extraction's expert signal, so the loss is 1
    when the system changes nothing and 0 when it adds exactly δ at every injection layer; it is scale-free, so its
    weight reads against CE's.

    Args:
        states: per injection layer j, the system's layer output (B, T, D) (with gradient).
        target: (B, L, T, D) h⁰ + δ per layer (left-padded like the batch).
        norm2: (B, L, T) ‖δ‖², 0 where a token has no target (padding, the attention sink, unaligned tokens).
        total: the denominator Σ‖δ‖² when ``states`` are a micro-batch of a larger batch (default: ``norm2``'s
            sum), so the micro-batches' losses add up to the batch's.
    """
    mask = (norm2 > 0).float()
    err = sum((((s.float() - target[:, j].to(s.device).float()).pow(2).sum(-1)) * mask[:, j].to(s.device)).sum()
              for j, s in enumerate(states))
    return err / (norm2.sum() if total is None else total).to(err.device).clamp_min(1e-12)
