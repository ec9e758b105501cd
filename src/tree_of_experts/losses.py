"""Token-level losses shared by extraction, training and evaluation."""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
    student = F.pad(logits[:, :-1].float(), (0, 0, 1, 0)).log_softmax(-1)  # (B, T, V) aligned with targets
    s = student.gather(-1, topk_ids.long())
    s = s - s.logsumexp(-1, keepdim=True)
    t = topk_logp.float() - topk_logp.float().logsumexp(-1, keepdim=True)
    kl = (t.exp() * (t - s)).sum(-1)  # (B, T)
    return kl * loss_mask
