"""Teacher -> base projection: a closed-form ridge map from streamed Gram matrices, and the trained fusion map.

The ridge map regresses the base's own state from the teacher's, so its residual ``P(u) - v`` is zero-mean noise
around the base's state (measured on the real pair: 64 oracle-routed leaves of it moved dev CE by 0 %). The
useful expert signal is what a *trained* map injects: ``A(u, h) = s ⊙ (W u + b - h)``, initialised from the ridge
map with ``s = 0`` and trained to lower the base's loss with the teacher's cached states.
"""

from __future__ import annotations

import torch
from torch import nn


class GramAccumulator:
    """Exact streaming sufficient statistics for ridge regression y ≈ [x, 1] W, in float64."""

    def __init__(self, d_in: int, d_out: int):
        self.xx = torch.zeros(d_in + 1, d_in + 1, dtype=torch.float64)
        self.xy = torch.zeros(d_in + 1, d_out, dtype=torch.float64)
        self.yy = 0.0
        self.y_sum = torch.zeros(d_out, dtype=torch.float64)
        self.n = 0

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """x (R, d_in), y (R, d_out) rows."""
        x1 = torch.cat([x.double(), x.new_ones(x.shape[0], 1, dtype=torch.float64)], 1)
        y = y.double()
        self.xx += x1.T @ x1
        self.xy += x1.T @ y
        self.yy += float((y * y).sum())
        self.y_sum += y.sum(0)
        self.n += x.shape[0]

    def sse(self, w: torch.Tensor) -> float:
        """Sum of squared errors of ``y ≈ [x, 1] w`` over the accumulated rows, without revisiting them."""
        return float((w * (self.xx @ w)).sum() - 2 * (w * self.xy).sum() + self.yy)

    def sst(self) -> float:
        return self.yy - float((self.y_sum**2).sum()) / max(self.n, 1)


def fit_ridge(train: GramAccumulator, heldout: GramAccumulator, alphas: tuple[float, ...] = (1e-6, 1e-5, 1e-4, 1e-3,
              1e-2, 1e-1, 1.0)) -> tuple[torch.Tensor, dict]:
    """Solves the ridge map for a grid of λ = α · mean eigenvalue; picks λ by held-out squared error.

    Returns:
        w: (d_in + 1, d_out) float32 with the bias in the last row.
        report: λ grid, held-out R² for each, the chosen λ.
    """
    evals, evecs = torch.linalg.eigh(train.xx)
    proj = evecs.T @ train.xy
    scale = float(evals.clamp_min(0).mean())
    best, grid = None, []
    for alpha in alphas:
        lam = alpha * scale
        w = evecs @ (proj / (evals.clamp_min(0) + lam)[:, None])
        r2 = 1.0 - heldout.sse(w) / max(heldout.sst(), 1e-12) if heldout.n else float("nan")
        grid.append({"alpha": alpha, "lambda": lam, "heldout_r2": r2})
        if best is None or (r2 > best[0]) or heldout.n == 0:
            best = (r2, lam, w)
            if heldout.n == 0:
                break
    r2, lam, w = best
    return w.float(), {"lambda": lam, "heldout_r2": r2, "grid": grid, "train_rows": train.n,
                       "heldout_rows": heldout.n}


class FusionMap(nn.Module):
    """A(u, h) = s ⊙ (W u + b - h): moves the base's state towards the projected teacher state, per channel.

    Args:
        w: (d_T + 1, d_B) ridge solution (bias in the last row) used to initialise W and b.
    """

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.proj = nn.Linear(w.shape[0] - 1, w.shape[1])
        with torch.no_grad():
            self.proj.weight.copy_(w[:-1].T)
            self.proj.bias.copy_(w[-1])
        self.scale = nn.Parameter(torch.zeros(w.shape[1]))

    def forward(self, u: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """u (..., d_T) teacher states, h (..., d_B) base states -> (..., d_B) float32 update δ."""
        return self.scale * (self.proj(u.float()) - h.float())


def ridge_delta(w: torch.Tensor, u: torch.Tensor, h: torch.Tensor, lam: float) -> torch.Tensor:
    """λ (P(u) - h): the untrained interpolation towards the ridge-projected teacher state."""
    return lam * (u.float() @ w[:-1] + w[-1] - h.float())
