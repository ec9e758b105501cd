"""The tokens the tree is clustered from, gathered in memory bounded by ``--max_rows``, not by the sample.

Each training example with states draws which of its valid tokens are sampled (``--sample_rate``); when more than
``max_rows`` are, each layer keeps ``max_rows`` of them drawn at random. Two passes over the shards: the first reads
each shard's ``valid`` column alone and makes the draws, the second computes the expert signal δ of an example's
sampled tokens and keeps only the picked rows, written straight to their place. The draws are the ones a single
pass gathering every sampled token makes (the same generator, in the same order), and δ is computed on the same
rows at a time, so the rows are bit-identical to that; only their memory differs: R rows of δ (fp32), h (fp16) and
where they came from per layer (R = min(max_rows, sampled tokens)), plus one shard, instead of every sampled token.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..errors import ToEError
from .store import CORRUPT, Extraction


class Rows(NamedTuple):
    """Per asked layer: δ (R, D_B, as the signal gives it), the base's state h (R, D_B, as stored) and the
    (example, row) each came from (R, 2, int64)."""

    deltas: list[torch.Tensor]
    states: list[torch.Tensor]
    where: list[torch.Tensor]


def sampled_rows(extraction: Extraction, heldout: set[int], layers: list[int], signal, sample_rate: float,
                 max_rows: int, seed: int) -> Rows:
    """:class:`Rows` at each injection layer j in ``layers`` (indices among the extraction's; δ = ``signal(j, u, h)``)
    from the training examples (not ``heldout``) with states. The predictability fit reads its training tokens the
    same way (one layer at a time)."""
    g = torch.Generator().manual_seed(seed)
    train = [r for r in extraction.example_refs(with_states=True, columns=("valid",)) if r.example not in heldout]
    keeps = []
    for r in train:
        v = r.columns["valid"].bool()
        keeps.append(v & (torch.rand(len(v), generator=g) < sample_rate))
    wanted = {r.example: keep for r, keep in zip(train, keeps)}
    if len(wanted) != len(train):  # the second pass finds each example by its number
        raise ToEError(f"{extraction.folder}'s shards hold an example twice: {CORRUPT}")
    n = sum(int(m.sum()) for m in keeps)
    # each layer's picked rows, sorted (where they are among the n sampled tokens) and where each goes in the output
    picks = []
    for _ in layers:
        pick = torch.randperm(n, generator=g)[:max_rows] if n > max_rows else torch.arange(n)
        rows, place = pick.sort()
        picks.append((rows, place))
    r = min(n, max_rows)
    deltas: list[torch.Tensor | None] = [None] * len(layers)
    states: list[torch.Tensor | None] = [None] * len(layers)
    where = [torch.empty(r, 2, dtype=torch.long) for _ in layers]
    start = 0
    with torch.no_grad():
        for ex in extraction.iter_examples(set(wanted), with_states=True):
            keep = wanted[int(ex["example"][0])]
            m = int(keep.sum())
            at = torch.stack([ex["example"][keep], keep.nonzero()[:, 0]], 1).long()
            for i, (j, (rows, place)) in enumerate(zip(layers, picks)):
                lo, hi = torch.searchsorted(rows, start), torch.searchsorted(rows, start + m)
                if lo == hi:
                    continue
                local, dest = rows[lo:hi] - start, place[lo:hi]
                h = ex[f"base.{j}"][keep]
                d = signal(j, ex[f"teacher.{j}"][keep].float(), h.float())  # every sampled row: as one pass computes it
                if deltas[i] is None:
                    deltas[i] = torch.empty(r, d.shape[1], dtype=d.dtype)
                    states[i] = torch.empty(r, h.shape[1], dtype=h.dtype)
                deltas[i][dest], states[i][dest], where[i][dest] = d[local], h[local], at[local]
            start += m
    if r == 0:  # nothing sampled: empty rows (the build then refuses too few tokens for the leaves)
        return Rows([torch.zeros(0, 1) for _ in layers], [torch.zeros(0, 1) for _ in layers], where)
    return Rows(deltas, states, where)
