"""The positions a plug-in may edit: every real token but the first of its sequence (the attention sink), read from
the attention mask, the KV cache's length or the positions of packed rows. Torch only: `toe export` copies this file
into the exported folder as ``toe_positions.py``, so the exported model edits exactly these positions."""

from __future__ import annotations

from typing import Any

import torch


def injection_mask(
    batch: int, length: int, device: torch.device, attention_mask: torch.Tensor | None, past_len: int,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, T) 1.0 where Δ may be added: real tokens that are not the first real token of their sequence.

    Args:
        attention_mask: (B, past + T) 2-D padding mask (1 = real), as ``generate`` passes it, or None.
        past_len: number of cached positions before these T tokens (used only without a mask).
        position_ids: (B, T) positions, where given: a position 0 starts a sequence, so sequences packed into one
            row (trl's ``padding_free``/``packing``, ``DataCollatorWithFlattening``) each keep their first token.
    """
    if attention_mask is not None and attention_mask.dim() == 2:
        am = attention_mask.to(device)
        first = am.cumsum(-1) == 1
        keep = (am.bool() & ~first)[:, -length:].float()  # (B, T) of (B, past + T)
    else:
        pos = past_len + torch.arange(length, device=device)
        keep = (pos > 0).float().expand(batch, length)
    if position_ids is not None and position_ids.dim() == 2 and position_ids.shape[-1] == length:
        keep = keep * (position_ids.to(device) > 0).float()
    return keep


def past_length(past: Any) -> int:
    """Positions already in the KV cache ``past`` (0 without one)."""
    if past is None:
        return 0
    if hasattr(past, "get_seq_length"):
        return int(past.get_seq_length())
    return int(past[0][0].shape[-2])  # legacy tuple cache (transformers < 4.47)
