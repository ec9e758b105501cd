"""Training examples: a data file tokenized with its loss mask and, from an extraction, the teacher's
cached top-k; batches of them."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal

import torch

from ..errors import ToEError
from ..data import DataSpec, Encoded, encode, file_hash, pad_left, read_jsonl, responses_cut_away
from ..extraction.store import CORRUPT_SHARD, REBUILT_BY, RUN, Extraction, read_rows

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardRef:
    """Where a training example's cached fields sit in an extraction's shard, and which of them it has: the teacher's
    top-k (``kd``), the base's state under ``state_key``, and with ``signal`` its state targets (computed from its
    states at every one of ``num_layers`` injection layers). A batch reads them (:meth:`Example.loaded`), so a run
    holds a batch's cached fields, not the training set's. ``stamp``: the shard's size and modification time when the
    run found it — a shard rewritten since (`toe extract --overwrite` during the run) is refused, not mixed in."""

    path: str
    rows: tuple[int, int]
    stamp: tuple[int, int]
    kd: bool = False
    state_key: str | None = None
    signal: Callable | None = None
    num_layers: int = 0
    device: str = "cpu"  # where the targets are computed: the signal's device

    def fields(self) -> list[str]:
        """The shard's fields a batch reads for this example (its input ids too: the rows must still be its)."""
        out = ["input_ids"]
        if self.kd:
            out += ["topk_ids", "topk_logp"]
        if self.state_key:
            out.append(self.state_key)
        if self.signal is not None:
            out += ["valid", *(f"{side}.{j}" for j in range(self.num_layers) for side in ("base", "teacher"))]
        return list(dict.fromkeys(out))  # (the low state is one of the target's states)

    def read(self, ids: torch.Tensor) -> dict[str, torch.Tensor | None]:
        """The example's cached fields as :class:`Example` names them; ``ids``: its tokens, which the rows must hold."""
        if shard_stamp(self.path) != self.stamp:
            raise ToEError(f"{self.path} changed since this run loaded its extraction (rewritten, e.g. by "
                           "`toe extract --overwrite`): restart the run to train on the new extraction")
        got = read_rows(self.path, self.rows, self.fields())
        if not torch.equal(got["input_ids"], ids):
            raise ToEError(f"{self.path} rows {self.rows} no longer hold this example: restart the run")
        target, norm2 = (state_targets(got, self.num_layers, self.signal, self.device) if self.signal is not None
                         else (None, None))
        return {"topk_ids": got.get("topk_ids"), "topk_logp": got.get("topk_logp"),
                "state": got.get(self.state_key) if self.state_key else None, "target": target, "target_norm2": norm2}


def shard_stamp(path: str) -> tuple[int, int]:
    """(size, modification time in ns) of a shard: what tells a rewritten one (missing: (-1, -1))."""
    try:
        st = os.stat(path)
    except OSError:
        return (-1, -1)
    return (st.st_size, st.st_mtime_ns)


@dataclass
class Example:
    ids: torch.Tensor  # (T,)
    loss_mask: torch.Tensor  # (T,) bool
    topk_ids: torch.Tensor | None  # (T, k) teacher top-k at target positions, or None
    topk_logp: torch.Tensor | None
    state: torch.Tensor | None = None  # (T, D) fp16 base state at the lowest injection layer (cached_state_layer)
    target: torch.Tensor | None = None  # (L, T, D) fp16 h⁰ + δ per injection layer (--state_loss_weight)
    target_norm2: torch.Tensor | None = None  # (L, T) ‖δ‖², 0 where a token has no target
    ref: ShardRef | None = None  # where the fields above are read from, when they are not held (load_examples)

    def has(self, name: Literal["topk_ids", "state", "target"]) -> bool:
        """Whether the example has ``name``, held or in its shard."""
        if getattr(self, name) is not None:
            return True
        r = self.ref
        in_shard = {"topk_ids": r.kd, "state": r.state_key is not None, "target": r.signal is not None} if r else {}
        return in_shard.get(name, False)

    def loaded(self) -> Example:
        """The example with its cached fields read from its shard (itself when it holds them)."""
        return self if self.ref is None else replace(self, ref=None, **self.ref.read(self.ids))


def encode_rows(data: str, spec: DataSpec, tok, max_length: int, limit: int | None,
                skip_truncated: bool = False) -> tuple[list[Encoded], list[int]]:
    """The training rows tokenized, and the indices of those kept. A row whose prompt fills ``max_length`` has
    nothing of its response left to train on (only the appended EOS): such rows are refused with their count and
    the max_length that keeps them, or with ``skip_truncated`` left out (and logged); the tokenizer alone decides,
    so commands check this before any model loads."""
    rows = read_jsonl(data, spec, limit)
    encoded = [encode(tok, spec.prompt(r), spec.response(r), max_length) for r in rows]
    bad, problem = responses_cut_away(encoded, max_length)
    if bad and len(bad) == len(encoded):
        raise ToEError(f"{data}: {problem}")
    if bad and not skip_truncated:
        raise ToEError(f"{data}: {problem}, or pass --skip_truncated true to train without them")
    if bad:
        logger.warning("--skip_truncated: leaving out %d of %d rows of %s whose prompt fills max_length=%d",
                       len(bad), len(encoded), data, max_length)
    gone = set(bad)
    return encoded, [i for i in range(len(encoded)) if i not in gone]


def state_targets(ex: dict, num_layers: int, signal, device: str | torch.device = "cpu"
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, T, D) fp16 h⁰ + δ and (L, T) ‖δ‖² of one cached example (δ 0 on tokens that are not valid), computed on
    ``device`` (the signal's: the training device, where the fusion map is cheap) and returned on the CPU."""
    valid = ex["valid"].bool().to(device)
    targets, norms = [], []
    with torch.no_grad():
        for j in range(num_layers):
            h, u = ex[f"base.{j}"].to(device).float(), ex[f"teacher.{j}"].to(device).float()
            d = signal(j, u[None], h[None])[0].float() * valid[:, None]
            targets.append((h + d).half().cpu())
            norms.append(d.pow(2).sum(-1).cpu())
    return torch.stack(targets), torch.stack(norms)


def load_examples(data: str, spec: DataSpec, tok, max_length: int, limit: int | None, experts: str,
                  use_kd: bool, cached_state_layer: int | None = None,
                  skip_truncated: bool = False, without_kd: str = "--no_kd true",
                  with_targets: bool = False, device: str | torch.device = "cpu") -> tuple[list[Example], bool, int]:
    """Tokenizes the training rows (:func:`encode_rows`: rows with nothing of their response left are refused, or
    skipped with ``skip_truncated``); attaches what the extraction cached for the same rows (same data file, same
    tokens): the teacher's top-k when ``use_kd``, and with ``cached_state_layer`` (an injection layer of the
    extraction) the base's state there, and with ``with_targets`` the state-loss targets at every injection layer
    (:func:`state_targets`, from the extraction's cached states and its expert signal). Under a disk budget
    (`toe extract --max_disk`) only the extraction's sample of examples has states: the others get no state target
    (the state loss reads the sampled examples' tokens; :func:`collate` gives the rest a zero ‖δ‖², i.e. no target),
    and a cached state only where the extraction kept the lowest layer's (--cache_low_states). The fields stay in the
    shards: each example keeps where they are (:class:`ShardRef`), and :func:`collate` reads a batch's. Returns
    (examples, whether any has the teacher's top-k, rows skipped).

    With ``use_kd`` every row must get the teacher's top-k: an extraction that cached none, cached it for another
    file or other tokens, or lacks shards is refused in one line naming the fix (``without_kd``: the option that
    trains without it)."""
    encoded, kept = encode_rows(data, spec, tok, max_length, limit, skip_truncated)
    refs: dict[int, tuple[torch.Tensor, ShardRef]] = {}  # example -> (its ids in the shard, where its fields are)
    extraction = Extraction(experts)
    run = extraction.run() if extraction.has(RUN) else {}
    if use_kd:
        check_kd_cache(extraction, run, data, without_kd)
    state_key = f"base.{run['layers'].index(cached_state_layer)}" if cached_state_layer is not None else None
    signal = None
    if with_targets:
        from ..extraction.fusion import extraction_signal

        signal = extraction_signal(extraction, run["layers"], device)[0]  # the targets computed on the device
    if (use_kd or state_key or with_targets) and run.get("data_sha256") == file_hash(data):
        stamps: dict[str, tuple[int, int]] = {}
        for r in extraction.example_refs(columns=("input_ids",)):  # where each example's fields are, not the fields
            with_states = with_targets and "teacher.0" in r.keys  # an example with states: state targets
            ref = ShardRef(r.path, r.rows, stamps.setdefault(r.path, shard_stamp(r.path)),
                           use_kd and "topk_ids" in r.keys, state_key if state_key in r.keys else None,
                           signal if with_states else None, len(run["layers"]) if with_states else 0, str(device))
            lost = sorted(set(ref.fields()) - r.keys)
            if lost:  # refused now, not at the batch that reads it
                raise ToEError(f"{r.path} lacks {lost[0]}: {CORRUPT_SHARD}")
            if ref.kd or ref.state_key or ref.signal:
                refs[r.example] = (r.columns["input_ids"], ref)
    out = []
    for i in kept:  # i: the row's index in the file, which the extraction's cache is keyed by
        e = encoded[i]
        ids, ref = refs.get(i, (None, None))
        matched = ref is not None and torch.equal(ids, e.input_ids)
        out.append(Example(e.input_ids, e.loss_mask, topk_ids=None, topk_logp=None, ref=ref if matched else None))
    has_kd = any(e.has("topk_ids") for e in out)
    lacking = sum(not e.has("topk_ids") for e in out) if use_kd else 0
    if lacking and not (state_key and any(not e.has("state") for e in out)):  # (else --cached_states is refused)
        raise ToEError(f"{lacking} of {len(out)} rows of {data} were tokenized otherwise than in {experts}, which has no "
                       "teacher top-k for them: use the extraction's --template/--max_length/--prompt_field/"
                       f"--response_field/--limit, or pass {without_kd} to train without distillation")
    return out, has_kd, len(encoded) - len(kept)


def check_kd_cache(extraction: Extraction, run: dict, data: str, without_kd: str = "--no_kd true") -> None:
    """Refuses, in one line naming the fix, an extraction that cannot give ``data``'s rows the teacher's top-k: it
    cached none, cached it for another file, or lacks (or holds cut) shards; before any model loads."""
    folder = extraction.folder
    if not run.get("topk_logprobs"):
        raise ToEError(f"--experts {folder} cached no teacher top-k log-probs (extracted with --topk_logprobs 0, or "
                       f"its teacher's vocabulary differs): pass {without_kd} to train without distillation, or "
                       "extract with --topk_logprobs > 0")
    if run.get("data_sha256") != file_hash(data):
        raise ToEError(f"--experts {folder} cached the teacher's top-k for another data file than {data}: pass the "
                       f"file it was extracted from, or {without_kd} to train without distillation")
    damaged = extraction.damaged_shards()
    if damaged or not extraction.shard_paths():
        what = ", ".join(damaged[:3]) + (", ..." if len(damaged) > 3 else "") if damaged else "shards/"
        raise ToEError(f"--experts {folder} lacks or holds damaged {what} (the teacher's cached top-k): {REBUILT_BY}, "
                       f"or pass {without_kd} to train without distillation")


def collate(batch: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    batch = [e.loaded() for e in batch]  # the cached fields read from their shards, this batch's only
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
    if batch and all(e.state is not None for e in batch):  # left-padded like the ids (padding rows: zeros)
        t = ids.shape[1]
        states = torch.zeros(len(batch), t, batch[0].state.shape[1], dtype=batch[0].state.dtype)
        for i, e in enumerate(batch):
            states[i, t - len(e.ids) :] = e.state
        out["states"] = states
    targeted = [e for e in batch if e.target is not None]
    if targeted:  # (B, L, T, D) and (B, L, T), left-padded; an example without a target: ‖δ‖² = 0, no target
        t, (layers, _, d) = ids.shape[1], targeted[0].target.shape
        target = torch.zeros(len(batch), layers, t, d, dtype=targeted[0].target.dtype)
        norm2 = torch.zeros(len(batch), layers, t)
        for i, e in enumerate(batch):
            if e.target is not None:
                target[i, :, t - len(e.ids) :], norm2[i, :, t - len(e.ids) :] = e.target, e.target_norm2
        out.update(state_target=target, state_norm2=norm2)
    return out
