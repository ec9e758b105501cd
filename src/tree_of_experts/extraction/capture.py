"""Paired teacher/base states on identical text: which layers, token alignment across tokenizers, and the capture
of one shard (states, ids, masks, the teacher's top-k next-token log-probs)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..data import DataSpec, align_offsets, encode, pad_left
from ..errors import ToEError
from ..hf.layers import capture_layers, padded_inputs, states_until
from ..losses import topk_logprobs


def default_layer(num_layers: int) -> int:
    """The middle of the base: injection there measured best in the first real-pair probe (layer 11 of 24)."""
    return num_layers // 2 - 1


def teacher_layer_for(base_layer: int, base_layers: int, teacher_layers: int) -> int:
    """Teacher layer at the same relative depth (layer outputs, 0-based): 11 of 24 -> 13 of 28."""
    return max(0, round((base_layer + 1) * teacher_layers / base_layers) - 1)


def resolve_layers(layers, teacher_layers, n_b: int | None, n_t: int | None) -> tuple[list[int], list[int]]:
    """The injection layers (default: the base's middle layer) and the teacher layer read for each (default: the
    same relative depth)."""
    layers = list(layers) if layers else [default_layer(n_b)]
    return layers, list(teacher_layers) if teacher_layers else [teacher_layer_for(ell, n_b, n_t) for ell in layers]


def check_layers(layers, teacher_layers, n_base: int | None, n_teacher: int | None) -> None:
    """Refuses injection layers that repeat or fall outside the base, teacher layers outside the teacher, and
    teacher layers that do not pair one to one with the injection layers (a count of None is not checked)."""
    if layers and len(set(layers)) != len(layers):
        raise ToEError(f"layers={list(layers)}: each injection layer once (give distinct decoder layer indices)")
    if layers and teacher_layers and len(teacher_layers) != len(layers):
        raise ToEError(f"teacher_layers={list(teacher_layers)} needs one entry per injection layer in "
                       f"layers={list(layers)}")
    for name, ls, n in (("layers", layers, n_base), ("teacher_layers", teacher_layers, n_teacher)):
        if ls and any(x < 0 for x in ls):
            raise ToEError(f"{name}={list(ls)}: decoder layer indices count from 0")
        if ls and n is not None and any(x >= n for x in ls):
            raise ToEError(f"{name}={list(ls)} out of range: that model has {n} decoder layers (0..{n - 1})")


def same_vocab(tok_a, tok_b) -> bool:
    return tok_a.get_vocab() == tok_b.get_vocab()


@dataclass
class Example:
    index: int
    ids: torch.Tensor  # (T,) base token ids
    loss_mask: torch.Tensor  # (T,) bool
    teacher_ids: torch.Tensor  # (T',) teacher token ids (== ids when the tokenizers agree)
    align: torch.Tensor  # (T,) teacher index for each base token (-1: none)


def prepare(records: list[dict], spec: DataSpec, base_tok, teacher_tok, max_length: int) -> list[Example]:
    shared = same_vocab(base_tok, teacher_tok)
    out = []
    for i, r in enumerate(records):
        prompt, response = spec.prompt(r), spec.response(r)
        b = encode(base_tok, prompt, response, max_length)
        if shared:
            out.append(Example(i, b.input_ids, b.loss_mask, b.input_ids, torch.arange(len(b.input_ids))))
            continue
        t = encode(teacher_tok, prompt, response, max_length)
        out.append(Example(i, b.input_ids, b.loss_mask, t.input_ids, align_offsets(b.offsets, t.offsets)))
    return out


# -- capture -----------------------------------------------------------------------------------------------------
@torch.no_grad()
def capture_shard(
    examples: list[Example],
    teacher, base, layers: list[int], teacher_layers: list[int], batch_size: int, topk: int, pad_id: int,
    kd: bool, timings: dict, full: bool = True, low: int | None = None,
) -> dict[str, torch.Tensor]:
    """Teacher-forced forward of both models; returns the shard's tensors (rows = kept tokens of each example).

    ``full=False`` captures a light shard (`toe extract --max_disk`): no teacher states, the base's state only at
    pair ``low`` (an index into ``layers``; None: none); each model runs only for what is kept."""
    dev = next(base.parameters()).device
    cols: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        ids_t, am_t = pad_left([e.teacher_ids for e in chunk], pad_id)
        ids_b, am_b = pad_left([e.ids for e in chunk], pad_id)
        t0 = time.perf_counter()
        one_pass = teacher is base and not kd  # the no-teacher control reads the base twice: one forward serves both
        if not full:  # a light shard: the teacher runs for its top-k alone
            t_states = {}
            if kd:
                t_logits = teacher(**padded_inputs(ids_t, am_t, dev)).logits
        elif one_pass:
            t_states = states_until(base, sorted({*layers, *teacher_layers}), padded_inputs(ids_t, am_t, dev))
        elif kd:  # the teacher's log-probs are cached too: a full forward
            with capture_layers(teacher, teacher_layers) as t_states:
                t_logits = teacher(**padded_inputs(ids_t, am_t, dev)).logits
        else:
            t_states = states_until(teacher, teacher_layers, padded_inputs(ids_t, am_t, dev))
        t1 = time.perf_counter()
        if not full:
            b_states = states_until(base, [layers[low]], padded_inputs(ids_b, am_b, dev)) if low is not None else {}
        else:
            b_states = t_states if one_pass else states_until(base, layers, padded_inputs(ids_b, am_b, dev))
        t2 = time.perf_counter()
        timings["teacher_s"] += t1 - t0
        timings["base_s"] += t2 - t1
        timings["tokens"] += int(am_b.sum())
        if kd:
            t_logits = t_logits.to(dev)  # (a teacher spread over devices returns them on its last one)
            t_nll, top_ids, top_logp = topk_logprobs(t_logits, ids_t.to(dev), am_t.to(dev).bool(), topk)
        for row, e in enumerate(chunk):
            tb, tt = ids_b.shape[1] - len(e.ids), ids_t.shape[1] - len(e.teacher_ids)  # left-pad offsets
            align = e.align
            valid = align >= 0
            valid[0] = False  # position 0 is the attention sink: never a training or injection row
            tix = tt + align.clamp_min(0)
            add = cols.setdefault
            add("input_ids", []).append(e.ids)
            add("loss_mask", []).append(e.loss_mask.to(torch.uint8))
            add("valid", []).append(valid.to(torch.uint8))
            add("example", []).append(torch.full((len(e.ids),), e.index, dtype=torch.long))
            for j, (lb, lt) in enumerate(zip(layers, teacher_layers)):
                if full or j == low:
                    add(f"base.{j}", []).append(b_states[lb][row, tb:].half().cpu())
                if full:
                    add(f"teacher.{j}", []).append(t_states[lt][row, tix].half().cpu())
            if kd:
                # Targets: base token t is predicted at teacher position (aligned t) - 1 (only used when ids match).
                src = (tix - 1).clamp_min(0)
                add("teacher_nll", []).append(t_nll[row, tix].float().cpu())
                last = top_ids.shape[1] - 1
                add("topk_ids", []).append(top_ids[row, src.clamp_max(last)].int().cpu())
                add("topk_logp", []).append(top_logp[row, src.clamp_max(last)].half().cpu())
    tensors = {k: torch.cat(v) for k, v in cols.items()}
    tensors["offsets"] = torch.tensor([0] + [len(e.ids) for e in examples]).cumsum(0)
    return tensors
