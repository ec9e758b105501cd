"""How much of the teacher's signal a teacher-free gate could ever select: δ predicted from the base's own state h.

At inference ToE sees only the base's state h_t; whatever it adds is a function of h_t. So the best any teacher-free
gate over any bank can do — whatever N, K or tree — is bounded by how well h_t predicts the expert signal
δ_t = A(u_t, h_t) (or the ridge step the bank was built from). This module fits that prediction on the extraction's
training tokens and measures it on its held-out examples:

    R²(layer) = 1 − Σ‖δ − δ̂(h)‖² / Σ‖δ − δ̄‖²        (held-out tokens; δ̄ the training mean: "after the mean")

with δ̂ a ridge map (closed form) and a small MLP (one hidden layer, early-stopped on a slice of the training
tokens), each fitted on at most ``FIT_ROWS`` training tokens drawn at random (the memory of a fit does not grow with
the extraction). `toe oracle` then injects δ̂(h) in place of δ and scores CE: the CE any teacher-free selection could reach
with that predictor. If it sits at the static-mean row (the mean δ added everywhere), routing cannot help at this
scale; if it sits near O1 (the live teacher's δ), a better gate could.
"""

from __future__ import annotations

import torch
from torch import nn

from .rows import sampled_rows
from .store import Extraction

MLP_HIDDEN = 512
FIT_ROWS = 200_000  # training tokens a predictor is fitted on at most (drawn at random, as the clustering's max_rows)


class Predictor(nn.Module):
    """δ̂(h): centred and scaled h -> ridge or MLP -> δ (float32 in, float32 out; (..., D) -> (..., D))."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, net: nn.Module):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.net = net

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net((h.float() - self.mean) / self.std)


def layer_rows(extraction: Extraction, j: int, signal, heldout: set[int], max_rows: int = FIT_ROWS,
               seed: int = 0) -> tuple[torch.Tensor, ...]:
    """(h_train, δ_train, h_held, δ_held) at injection layer j: every valid token (not the attention sink), split by
    the extraction's held-out examples; at most ``max_rows`` training tokens, drawn at random (rows.py: memory
    bounded by them, whatever the sample). ``signal(j, u, h)`` is the expert signal the bank was built from."""
    d, h, _ = sampled_rows(extraction, heldout, [j], signal, 1.0, max_rows, seed)
    held_h, held_d = [], []
    with torch.no_grad():
        for ex in extraction.iter_examples(heldout, with_states=True) if heldout else ():
            keep = ex["valid"].bool()
            held_h.append(ex[f"base.{j}"][keep].float())
            held_d.append(signal(j, ex[f"teacher.{j}"][keep].float(), held_h[-1]).float())
    cat = lambda xs: torch.cat(xs) if xs else torch.zeros(0, h[0].shape[-1])  # noqa: E731
    return h[0].float(), d[0].float(), cat(held_h), cat(held_d)


def r2(pred: torch.Tensor, target: torch.Tensor, mean: torch.Tensor) -> float:
    """1 − SSE/SST around ``mean`` (the training mean of δ): the share of δ's variation the prediction explains."""
    sst = (target - mean).pow(2).sum()
    return float(1 - (target - pred).pow(2).sum() / sst) if sst > 0 else float("nan")


def _standardise(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Centre per dimension, scale by one number (the centred states' RMS): a per-dimension std would blow up a
    dimension that barely moves on the training tokens (residual streams have such outlier dimensions)."""
    mean = h.mean(0)
    return mean, (h - mean).pow(2).mean().sqrt().clamp_min(1e-6).expand_as(mean).clone()


def _split(n: int, frac: float = 0.1, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A validation slice of the training tokens (for λ and early stopping; the held-out examples stay unseen)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    k = max(1, int(n * frac))
    return perm[k:], perm[:k]


def fit_ridge(h: torch.Tensor, d: torch.Tensor, lambdas=(1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)) -> Predictor:
    """Ridge δ̂ = W z + b on standardised z, λ chosen on a validation slice, then refit on all training tokens."""
    mean, std = _standardise(h)
    z = (h - mean) / std
    fit_i, val_i = _split(len(z))

    def solve(rows: torch.Tensor, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = z[rows].double(), d[rows].double()
        xm, ym = x.mean(0), y.mean(0)
        xc = x - xm
        w = torch.linalg.solve(xc.T @ xc + lam * len(x) * torch.eye(x.shape[1], dtype=x.dtype), xc.T @ (y - ym))
        return w.float(), (ym - xm @ w).float()

    def err(lam: float) -> float:
        w, b = solve(fit_i, lam)
        return float((z[val_i] @ w + b - d[val_i]).pow(2).sum())

    best = min(lambdas, key=err)
    w, b = solve(torch.arange(len(z)), best)
    lin = nn.Linear(h.shape[1], d.shape[1])
    with torch.no_grad():
        lin.weight.copy_(w.T)
        lin.bias.copy_(b)
    return Predictor(mean, std, lin).eval()


@torch.enable_grad()  # callers may hold no_grad (the oracle scores inside it)
def fit_mlp(h: torch.Tensor, d: torch.Tensor, hidden: int = MLP_HIDDEN, max_epochs: int = 30, lr: float = 1e-3,
            batch: int = 1024, seed: int = 0, min_steps: int = 300) -> Predictor:
    """A one-hidden-layer MLP δ̂(z), Adam, early-stopped on a validation slice (the best epoch is kept; at least
    ``min_steps`` steps are offered on small data)."""
    torch.manual_seed(seed)
    mean, std = _standardise(h)
    z = (h - mean) / std
    fit_i, val_i = _split(len(z), seed=seed)
    net = nn.Sequential(nn.Linear(h.shape[1], hidden), nn.GELU(), nn.Linear(hidden, d.shape[1]))
    with torch.no_grad():  # it starts at the mean of δ (R² 0): training keeps only what beats the mean
        net[2].weight.zero_()
        net[2].bias.copy_(d[fit_i].mean(0))
    opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=1e-4)
    with torch.no_grad():
        best = float((net(z[val_i]) - d[val_i]).pow(2).mean())
    best_state, patience = {k: v.clone() for k, v in net.state_dict().items()}, 0
    g = torch.Generator().manual_seed(seed)
    per_epoch = -(-len(fit_i) // batch)
    for _ in range(max(max_epochs, -(-min_steps // per_epoch))):
        order = fit_i[torch.randperm(len(fit_i), generator=g)]
        for k in range(0, len(order), batch):
            rows = order[k : k + batch]
            loss = (net(z[rows]) - d[rows]).pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        with torch.no_grad():
            val = float((net(z[val_i]) - d[val_i]).pow(2).mean())
        if val < best - 1e-9:
            best, best_state, patience = val, {k: v.clone() for k, v in net.state_dict().items()}, 0
        else:
            patience += 1
            if patience >= 5:
                break
    net.load_state_dict(best_state)
    return Predictor(mean, std, net).eval()


def predictability(extraction: Extraction, layers: list[int], signal, heldout: set[int],
                   mlp: bool = True) -> tuple[dict, dict[str, list[Predictor]]]:
    """Per injection layer: held-out R² of δ from h (ridge, MLP), the mean's share of δ's energy (how static δ is),
    and the token counts; with the fitted predictors ({"ridge": [per layer], "mlp": [...]}) for injection."""
    report, predictors = {}, {"ridge": [], "mlp": []}
    for j, layer in enumerate(layers):
        h, d, hh, dh = layer_rows(extraction, j, signal, heldout)
        if not len(hh):  # no held-out examples: the training tokens' validation slice stands in (said so)
            rest, val = _split(len(h), 0.2, seed=1)
            h, d, hh, dh = h[rest], d[rest], h[val], d[val]
        mean = d.mean(0)
        entry = {"train_tokens": len(h), "heldout_tokens": len(hh),
                 "mean_share": float(mean.pow(2).sum() * len(d) / d.pow(2).sum().clamp_min(1e-12))}
        ridge = fit_ridge(h, d)
        with torch.no_grad():
            entry["r2_ridge"] = r2(ridge(hh), dh, mean)
        predictors["ridge"].append(ridge)
        if mlp:
            net = fit_mlp(h, d)
            with torch.no_grad():
                entry["r2_mlp"] = r2(net(hh), dh, mean)
            predictors["mlp"].append(net)
        report[str(layer)] = entry
    return report, predictors
