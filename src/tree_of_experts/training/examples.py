"""Training examples: a data file tokenized with its loss mask and, from an extraction, the teacher's
cached top-k; batches of them."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data import DataSpec, encode, file_hash, pad_left, read_jsonl
from ..extraction.store import RUN, Extraction


@dataclass
class Example:
    ids: torch.Tensor  # (T,)
    loss_mask: torch.Tensor  # (T,) bool
    topk_ids: torch.Tensor | None  # (T, k) teacher top-k at target positions, or None
    topk_logp: torch.Tensor | None


def load_examples(data: str, spec: DataSpec, tok, max_length: int, limit: int | None, experts: str,
                  use_kd: bool) -> tuple[list[Example], bool]:
    """Tokenizes the training rows; attaches the teacher's cached top-k when the extraction saw the same rows."""
    rows = read_jsonl(data, spec, limit)
    encoded = [encode(tok, spec.prompt(r), spec.response(r), max_length) for r in rows]
    kd_rows: dict[int, dict] = {}
    extraction = Extraction(experts)
    if use_kd and extraction.has(RUN):
        run = extraction.run()
        if run.get("topk_logprobs") and run.get("data_sha256") == file_hash(data):
            for ex in extraction.iter_examples():
                kd_rows[int(ex["example"][0])] = ex
    out = []
    for i, e in enumerate(encoded):
        cached = kd_rows.get(i)
        if cached is not None and torch.equal(cached["input_ids"], e.input_ids):
            out.append(Example(e.input_ids, e.loss_mask, cached["topk_ids"], cached["topk_logp"]))
        else:
            out.append(Example(e.input_ids, e.loss_mask, None, None))
    has_kd = any(e.topk_ids is not None for e in out)
    return out, has_kd


def collate(batch: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    ids, am = pad_left([e.ids for e in batch], pad_id)
    loss_mask = pad_left([e.loss_mask.long() for e in batch], 0)[0].bool()
    out = {"input_ids": ids, "attention_mask": am, "loss_mask": loss_mask}
    k = next((e.topk_ids.shape[1] for e in batch if e.topk_ids is not None), None)
    if k is not None:
        t = ids.shape[1]
        tid = torch.zeros(len(batch), t, k, dtype=torch.long)
        tlp = torch.zeros(len(batch), t, k)
        kd_mask = torch.zeros(len(batch), t, dtype=torch.bool)
        for i, e in enumerate(batch):
            if e.topk_ids is not None:
                n = len(e.ids)
                tid[i, t - n :], tlp[i, t - n :] = e.topk_ids.long(), e.topk_logp.float()
                kd_mask[i, t - n :] = e.loss_mask
        out.update(topk_ids=tid, topk_logp=tlp, kd_mask=kd_mask)
    return out
