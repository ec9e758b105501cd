"""Teacher -> base maps: a closed-form ridge map from streamed Gram matrices and the trained fusion map, with the
fusion map's training loop and the CE of a base with an injection (shared by the extraction, O1 on held-out traces,
and `toe oracle`, O1/O2 on evaluation items).

The ridge map regresses the base's own state from the teacher's, so its residual ``P(u) - v`` is zero-mean noise
around the base's state (measured on the real pair: 64 oracle-routed leaves of it moved dev CE by 0 %). The
useful expert signal is what a *trained* map injects: ``A(u, h) = s ⊙ (W u + b - h)``, initialised from the ridge
map with ``s = 0`` and trained to lower the base's loss with the teacher's cached states."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import ToEError
from ..data import pad_left
from ..hf.layers import add_to_layers, padded_inputs
from ..losses import tail_positions, token_nll
from ..model import frozen
from ..training.checkpoint import log_progress


# -- the maps -----------------------------------------------------------------
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


def expert_signal(kind: str, maps, ridge: list[torch.Tensor], lam: float):
    """The expert signal δ_j(u, h) a bank is built from (and O2 routes by): the trained fusion map A_j(u, h)
    ("fusion_map") or the untrained ridge step λ (P_j(u) - h) ("ridge")."""
    if kind == "ridge":
        return lambda j, u, h: ridge_delta(ridge[j], u, h, lam)
    if kind == "fusion_map":
        return lambda j, u, h: maps[j](u, h)
    raise ToEError(f"expert signal {kind!r} is unknown (this version knows fusion_map and ridge): upgrade "
                   "tree-of-experts, or rebuild the extraction with --signal fusion_map")


def extraction_signal(extraction, layers: list[int], device: str | torch.device = "cpu"):
    """(signal, maps, ridge, (kind, λ)) of an extraction: its trained fusion maps and ridge maps per injection layer
    (on ``device``) and the expert signal δ_j(u, h) its bank was built from (:func:`expert_signal`)."""
    proj = extraction.projector()
    maps, ridge = [], []
    for layer in layers:
        w = proj[f"ridge.{layer}"]
        fm = FusionMap(w)
        fm.load_state_dict({k.split(".", 2)[2]: v for k, v in proj.items() if k.startswith(f"trained.{layer}.")})
        maps.append(fm.to(device).eval())
        ridge.append(w.to(device))
    kind, lam = signal_of(extraction.summary())
    return expert_signal(kind, maps, ridge, lam), maps, ridge, (kind, lam)


def signal_record(kind: str, lam: float) -> dict:
    """How an extraction's summary (and `toe oracle`'s result) records its expert signal; read back by `signal_of`."""
    return {"kind": kind, **({"lambda": lam} if kind == "ridge" else {})}


def signal_of(summary: dict) -> tuple[str, float]:
    """An extraction's expert signal and its λ (extractions made before the choice existed used the fusion map)."""
    sig = summary.get("signal") or {}
    return sig.get("kind", "fusion_map"), sig.get("lambda", 0.25)


# -- training and scoring them ------------------------------------------------
def batches(examples: Sequence, size: int) -> Iterator[list]:
    for i in range(0, len(examples), size):
        yield examples[i : i + size]


def collate(chunk: list[dict], num_layers: int, pad_id: int) -> dict[str, torch.Tensor]:
    ids, am = pad_left([c["input_ids"] for c in chunk], pad_id)
    out = {"input_ids": ids, "attention_mask": am}
    for key in ("loss_mask", "valid"):
        out[key] = pad_left([c[key].bool().long() for c in chunk], 0)[0].bool()
    for j in range(num_layers):
        t = max(len(c["input_ids"]) for c in chunk)
        u = torch.zeros(len(chunk), t, chunk[0][f"teacher.{j}"].shape[1])
        for i, c in enumerate(chunk):
            u[i, t - len(c["input_ids"]) :] = c[f"teacher.{j}"].float()
        out[f"teacher.{j}"] = u
    return out


def response_nll(base, b: dict[str, torch.Tensor], dev) -> torch.Tensor:
    """(B, tail) NLL of a left-padded batch's response tokens, the vocabulary projected only over the batch's tail
    (from the position before its first target): prompt and padding positions cost no logits (152k columns for
    Qwen2.5), which is most of a step's peak memory."""
    keep = tail_positions(b["loss_mask"], dev)
    logits = base(**padded_inputs(b["input_ids"], b["attention_mask"], dev), logits_to_keep=keep).logits
    return token_nll(logits, b["input_ids"][:, -len(keep):].to(dev), b["loss_mask"][:, -len(keep):].to(dev))


def example_ce(base, layers: list[int], data: Sequence[dict], pad_id: int, delta_fn=None,
               batch_size: int = 4) -> list[tuple[float, int]]:
    """(NLL sum, token count) over each example's response tokens, optionally with ``delta_fn(j, u, h) -> Δ``
    injected at injection layer j (u: the example's cached teacher states)."""
    out = []
    dev = next(base.parameters()).device
    with torch.no_grad():
        for chunk in batches(data, batch_size):
            b = collate(chunk, len(layers), pad_id)
            fns = {}
            if delta_fn is not None:
                for j, layer in enumerate(layers):
                    u, m = b[f"teacher.{j}"].to(dev), b["valid"].to(dev)
                    fns[layer] = lambda h, j=j, u=u, m=m: delta_fn(j, u, h) * m[..., None]
            with add_to_layers(base, fns):
                nll = response_nll(base, b, dev)
            out += [(float(nll[i].sum()), int(b["loss_mask"][i].sum())) for i in range(len(chunk))]
    return out


def mean_ce(base, layers: list[int], data: Sequence[dict], pad_id: int, delta_fn=None, batch_size: int = 4) -> float:
    """Token-weighted mean response CE (see :func:`example_ce`)."""
    per = example_ce(base, layers, data, pad_id, delta_fn, batch_size)
    return sum(s for s, _ in per) / max(sum(n for _, n in per), 1)


def train_fusion_maps(
    base, layers: list[int], maps: torch.nn.ModuleList, data: Sequence[dict], pad_id: int, steps: int, lr: float,
    batch_size: int, seed: int, dev_data: Sequence[dict] | None = None,
) -> tuple[list[float], dict | None]:
    """Trains A_j(u, h) injected at each layer to lower the base's response CE with cached teacher states:
    ``steps`` optimiser steps cycling over ``data`` (a fresh order each pass; a state sample trains as many steps as
    the whole corpus would give). Where that is more than one pass and ``dev_data`` is given, the held-out CE after
    each pass picks the maps kept (a small sample overfits in a few passes). Returns the losses and the pick
    (``None`` for one pass): the held-out CE by pass, the pass kept and its step count."""
    dev = next(base.parameters()).device
    maps.to(dev).train()
    opt = torch.optim.Adam(maps.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    losses = []
    per_pass = math.ceil(len(data) / batch_size)
    passes = math.ceil(steps / per_pass) if per_pass else 0
    bar = tqdm(total=steps, desc="train fusion map", leave=False, disable=None)  # None: off when not a terminal
    # without a terminal: a progress line per 5 % of the steps (each step when there are fewer than 40)
    every, start = max(1, steps // 20), time.perf_counter()
    # Only the maps learn: unfrozen, the backward also builds weight gradients for every base matrix (the LM head's
    # alone costs about as much as the forward) and keeps 4 bytes per base parameter of them.
    pick = {"heldout_ce_by_pass": [], "kept_pass": 0, "kept_steps": 0} if passes > 1 and dev_data else None
    best = None
    with frozen(base):
        for _ in range(passes):
            maps.train()  # (a pick's held-out scoring left them in eval mode)
            order = torch.randperm(len(data), generator=g).tolist()
            for idx in batches(order, batch_size):
                if len(losses) == steps:  # the last pass over a sample stops at the step count
                    break
                chunk = [data[i] for i in idx]  # (a lazy sequence reads only this batch's examples)
                b = collate(chunk, len(layers), pad_id)
                fns = {}
                for j, layer in enumerate(layers):
                    u, m = b[f"teacher.{j}"].to(dev), b["valid"].to(dev)
                    fns[layer] = lambda h, j=j, u=u, m=m: maps[j](u, h) * m[..., None]
                with add_to_layers(base, fns):
                    loss = response_nll(base, b, dev).sum() / b["loss_mask"].sum().clamp_min(1).to(dev)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(loss.item())
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}")
                if bar.disable and (len(losses) % every == 0 or len(losses) == steps):  # loss: the interval's mean
                    log_progress("train fusion map", {"step": len(losses), "loss": sum(losses[-every:]) / every,
                                                      "elapsed_s": time.perf_counter() - start}, steps)
            if pick is not None:  # the pass's maps on the held-out examples; the best pass's are kept
                maps.eval()
                ce = mean_ce(base, layers, dev_data, pad_id, lambda j, u, h: maps[j](u, h))
                pick["heldout_ce_by_pass"].append(ce)
                if best is None or ce < best:
                    best, pick["kept_pass"], pick["kept_steps"] = ce, len(pick["heldout_ce_by_pass"]), len(losses)
                    kept = {k: v.detach().clone() for k, v in maps.state_dict().items()}
    bar.close()
    if pick is not None:
        maps.load_state_dict(kept)
    maps.eval()
    return losses, pick
