"""The expert bank: N leaf vectors in the base's hidden space, stored as unit directions and norms."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

# Steps taken by any torch optimizer in this process. Fused optimizers (torch's fused AdamW, transformers' default)
# update parameters without bumping their versions, so the bank's cached vectors are keyed by this count too: a step
# between two no-grad forwards (a trainer's on-policy sampling, an evaluation) must not leave them stale.
_optimizer_steps = 0


DENSE_BLOCK_BYTES = 64 << 20  # a mapped bank's dense mix reads this many bytes of float32 rows at a time
# An in-RAM bank whose float32 vectors are larger is mixed from its rows as a mapped one is: a cached N × D copy for
# inference would hold the bank twice (1.86 GB for a 0.96 GB file: docs/speed.md, bank scale)
CACHE_MAX_BYTES = 256 << 20


def _count_step(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


register_optimizer_step_post_hook(_count_step)


class ExpertBank(nn.Module):
    """N expert vectors e_i = norm_i * direction_i / ||direction_i||.

    Direction and norm are separate parameters so training can move either (and a bank can be frozen in
    direction only); the gate never reads the bank, so it cannot prefer a leaf for its norm.

    Args:
        vectors: (N, D) initial expert vectors (teacher-derived, or random).
        info: JSON-serialisable metadata (teacher id, layers, projection fit, how the bank was built).
    """

    def __init__(self, vectors: torch.Tensor, info: dict[str, Any] | None = None):
        super().__init__()
        vectors = vectors.detach().float()
        norm = vectors.norm(dim=-1)
        self.direction = nn.Parameter(vectors / norm.clamp_min(1e-12)[:, None])  # (N, D)
        self.norm = nn.Parameter(norm)  # (N,)
        self.info = dict(info or {})
        # rows read from a map of the plug-in file (ToEPlugin.load(mmap=True)): frozen, and `mix` gathers the K rows
        # it needs instead of computing all N vectors, so only their pages are ever read
        self.mapped = False
        self._cached: tuple[tuple, torch.Tensor] | None = None  # vectors() for inference, keyed by parameter versions

    @property
    def num_leaves(self) -> int:
        return self.direction.shape[0]

    @property
    def by_rows(self) -> bool:
        """Whether ``mix`` gathers the K rows it needs (and ``mix_dense`` reads blocks of rows) instead of using all
        N vectors at once: a mapped bank, or one whose float32 vectors exceed ``CACHE_MAX_BYTES``."""
        return self.mapped or self.direction.numel() * 4 > CACHE_MAX_BYTES

    def vectors(self) -> torch.Tensor:
        """(N, D) float32 expert vectors. Without autograd (generation, eval) they are computed once and reused
        until a parameter changes (a load bumps its version, an optimizer steps); a bank mixed by rows
        (:attr:`by_rows`) keeps no copy."""
        if torch.is_grad_enabled() or torch.compiler.is_compiling() or self.by_rows:
            return self._vectors()
        key = (self.direction._version, self.norm._version, self.direction.data_ptr(), self.norm.data_ptr(),
               _optimizer_steps)
        if self._cached is None or self._cached[0] != key:
            self._cached = (key, self._vectors())
        return self._cached[1]

    def _vectors(self, rows: slice = slice(None)) -> torch.Tensor:
        """The expert vectors of ``rows`` (default all), in float32 (a float16 map too)."""
        return F.normalize(self.direction[rows].float(), dim=-1) * self.norm[rows].float()[:, None]

    def mix(self, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Σ_k weights_k e_{indices_k}: (B, T, K) ids and weights -> (B, T, D) float32."""
        if self.by_rows:  # the K rows alone, normalised as `_vectors` normalises every row (the same numbers)
            direction = F.embedding(indices, self.direction).float()  # (B, T, K, D)
            e = F.normalize(direction, dim=-1) * F.embedding(indices, self.norm[:, None]).float()
        else:
            e = F.embedding(indices, self.vectors())  # (B, T, K, D)
        return (weights.unsqueeze(-2) @ e).squeeze(-2)

    def mix_dense(self, probs: torch.Tensor) -> torch.Tensor:
        """Σ_i probs_i e_i over all leaves: (B, T, N) -> (B, T, D), one matmul instead of a (B, T, N, D) gather. A
        bank mixed by rows (mapped, or large) is read a block of rows at a time (about 64 MB of float32 each), never
        as a whole N × D copy."""
        if not self.by_rows or self.direction.requires_grad and torch.is_grad_enabled():  # training: one product (a
            return probs @ self.vectors()  # block's slice would add a zero-filled N × D gradient per block backward)
        rows = max(1, DENSE_BLOCK_BYTES // (4 * self.direction.shape[1]))
        out = probs.new_zeros(*probs.shape[:-1], self.direction.shape[1])
        for i in range(0, self.num_leaves, rows):
            out = out + probs[..., i:i + rows] @ self._vectors(slice(i, i + rows))
        return out

    def delta(self, route: Any, dense: bool, scale: torch.Tensor, h: torch.Tensor, clip: float,
              mask: torch.Tensor) -> torch.Tensor:
        """One injection's Δ = a · s ⊙ Σ_{i∈K} g_i e_i for a gate's ``route`` (its indices, weights and intensity a;
        ``dense``: weights over every leaf), clipped to ||Δ|| <= ``clip`` ||h|| per token and zero where ``mask``
        (B, T) is 0: (B, T, D) float32. The library's injection layer and the exported model's both compute it here."""
        mixed = self.mix_dense(route.weights) if dense else self.mix(route.indices, route.weights)  # (B, T, D)
        delta = scale * mixed
        if route.intensity is not None:
            delta = delta * route.intensity
        h_norm = h.float().norm(dim=-1, keepdim=True)
        d_norm = delta.norm(dim=-1, keepdim=True)
        delta = delta * torch.clamp(clip * h_norm / (d_norm + 1e-6), max=1.0)
        return delta * mask[..., None].to(delta.dtype)


def geometry(vectors: torch.Tensor) -> dict[str, float | None]:
    """How much of a bank is one shared vector, for (N, D) leaves v_i with mean m.

    ``common_share`` = ‖m‖² / mean ‖v_i‖²: 1 when every leaf is the same vector (routing then cannot matter: the
    plug-in is a static vector), about 1/N for unrelated leaves; ``cos_to_common_median``: median cos(v_i, m);
    ``spread``: mean ‖v_i − m‖. None where the bank is all zeros.
    """
    v = vectors.detach().float()
    mean = v.mean(0)
    energy = float(v.pow(2).sum(-1).mean())
    cos = F.cosine_similarity(v, mean.expand_as(v), dim=-1) if energy > 0 else None
    return {
        "leaf_norm_mean": float(v.norm(dim=-1).mean()),
        "common_norm": float(mean.norm()),
        "spread": float((v - mean).norm(dim=-1).mean()),
        "common_share": float(mean.pow(2).sum()) / energy if energy > 0 else None,
        "cos_to_common_median": float(cos.median()) if cos is not None else None,
    }
