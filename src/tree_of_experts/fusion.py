"""The trained fusion map's loop and the CE of a base with an injection: shared by the extraction (O1 on held-out
traces) and `toe oracle` (O1/O2 on evaluation items)."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from tqdm.auto import tqdm

from .data import pad_left
from .hf import add_to_layers, padded_inputs
from .losses import token_nll
from .model import frozen


def batches(examples: list[dict], size: int) -> Iterator[list[dict]]:
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


def example_ce(base, layers: list[int], data: list[dict], pad_id: int, delta_fn=None,
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
                logits = base(**padded_inputs(b["input_ids"], b["attention_mask"], dev)).logits
            nll = token_nll(logits, b["input_ids"].to(dev), b["loss_mask"].to(dev))
            out += [(float(nll[i].sum()), int(b["loss_mask"][i].sum())) for i in range(len(chunk))]
    return out


def mean_ce(base, layers: list[int], data: list[dict], pad_id: int, delta_fn=None, batch_size: int = 4) -> float:
    """Token-weighted mean response CE (see :func:`example_ce`)."""
    per = example_ce(base, layers, data, pad_id, delta_fn, batch_size)
    return sum(s for s, _ in per) / max(sum(n for _, n in per), 1)


def train_fusion_maps(
    base, layers: list[int], maps: torch.nn.ModuleList, data: list[dict], pad_id: int, epochs: int, lr: float,
    batch_size: int, seed: int,
) -> list[float]:
    """Trains A_j(u, h) injected at each layer to lower the base's response CE with cached teacher states."""
    dev = next(base.parameters()).device
    maps.to(dev).train()
    opt = torch.optim.Adam(maps.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    losses = []
    steps = epochs * math.ceil(len(data) / batch_size)
    bar = tqdm(total=steps, desc="train fusion map", leave=False, disable=None)  # None: off when not a terminal
    # Only the maps learn: unfrozen, the backward also builds weight gradients for every base matrix (the LM head's
    # alone costs about as much as the forward) and keeps 4 bytes per base parameter of them.
    with frozen(base):
        for _ in range(epochs):
            order = torch.randperm(len(data), generator=g).tolist()
            for chunk in batches([data[i] for i in order], batch_size):
                b = collate(chunk, len(layers), pad_id)
                fns = {}
                for j, layer in enumerate(layers):
                    u, m = b[f"teacher.{j}"].to(dev), b["valid"].to(dev)
                    fns[layer] = lambda h, j=j, u=u, m=m: maps[j](u, h) * m[..., None]
                with add_to_layers(base, fns):
                    logits = base(**padded_inputs(b["input_ids"], b["attention_mask"], dev)).logits
                mask = b["loss_mask"].to(dev)
                loss = token_nll(logits, b["input_ids"].to(dev), mask).sum() / mask.sum().clamp_min(1)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(loss.item())
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    maps.eval()
    return losses
