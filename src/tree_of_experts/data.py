"""Reasoning data: JSONL records -> prompt/response text -> token ids with a response (loss) mask."""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, replace
from typing import Any

import torch

from .config import ToEError

CALC_NOTE = re.compile(r"<<[^>]*>>")
CHAT = "chat"  # template value: the tokenizer's own chat template around the question


@dataclass
class DataSpec:
    """How a record becomes text.

    Attributes:
        prompt_field: record field holding the question (GSM8K: "question", MATH: "problem").
        response_field: record field holding the reasoning trace (GSM8K: "answer", MATH: "solution").
        template: prompt template; ``{prompt}`` is replaced by the question. ``"chat"``: the tokenizer's chat
            template around one user turn holding the question (resolved by `for_tokenizer`).
        strip_calc: drop GSM8K's ``<<48/2=24>>`` calculator notes from responses.
    """

    prompt_field: str = "question"
    response_field: str = "answer"
    template: str = "Question: {prompt}\nAnswer: "
    strip_calc: bool = False

    def __post_init__(self) -> None:
        if self.template != CHAT and "{prompt}" not in self.template:
            raise ToEError(f"template {self.template!r} has no {{prompt}} placeholder: add one where the question "
                           "goes, or pass 'chat' for the tokenizer's chat template")

    def for_tokenizer(self, tokenizer) -> DataSpec:
        """This spec with a ``"chat"`` template rendered by ``tokenizer``'s chat template into a plain ``{prompt}``
        template (system turn, user turn, assistant header); any other template is returned as is."""
        if self.template != CHAT:
            return self
        return replace(self, template=chat_template(tokenizer, "pass a --template with {prompt} instead"))

    def prompt(self, record: dict[str, Any]) -> str:
        if self.template == CHAT:
            raise ToEError("template 'chat' is resolved with the tokenizer first (DataSpec.for_tokenizer)")
        return self.template.replace("{prompt}", str(record[self.prompt_field]))

    def response(self, record: dict[str, Any]) -> str:
        text = str(record[self.response_field])
        return CALC_NOTE.sub("", text) if self.strip_calc else text


HUB = "hf:"


def chat_template(tokenizer, fix: str) -> str:
    """``tokenizer``'s chat template around one user turn, rendered as a plain ``{prompt}`` template (system turn,
    user turn, assistant header). Raises a one-line ToEError ending with ``fix`` when the tokenizer has none or its
    template rewrites the user's text."""
    if not getattr(tokenizer, "chat_template", None):
        raise ToEError(f"the tokenizer of {tokenizer.name_or_path!r} has no chat template; {fix}")
    text = tokenizer.apply_chat_template([{"role": "user", "content": "{prompt}"}], tokenize=False,
                                         add_generation_prompt=True)
    if text.count("{prompt}") != 1:
        raise ToEError(f"the chat template of {tokenizer.name_or_path!r} does not keep the user turn verbatim; {fix}")
    return text


def _hub_rows(ref: str, limit: int | None) -> tuple[list[dict], str]:
    """Rows and fingerprint of ``hf:NAME:SPLIT`` or ``hf:NAME:CONFIG:SPLIT`` via `datasets.load_dataset` (a hub id,
    or a local folder of data files)."""
    parts = ref[len(HUB):].split(":")
    if len(parts) not in (2, 3) or not all(parts):
        raise ToEError(f"{ref!r}: write hf:NAME:SPLIT or hf:NAME:CONFIG:SPLIT (e.g. hf:openai/gsm8k:main:test)")
    name, config, split = parts[0], parts[1] if len(parts) == 3 else None, parts[-1]
    if limit is not None:
        split = f"{split}[:{limit}]"
    try:
        from datasets import load_dataset

        ds = load_dataset(name, config, split=split)
    except Exception as e:  # datasets raises many types (network, missing config, bad split)
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ToEError(f"could not load {ref!r} with datasets ({reason}): check name, config and split, or pass a "
                       "local JSONL file") from None
    return [dict(r) for r in ds], ds._fingerprint


def read_jsonl(path: str | os.PathLike, spec: DataSpec | None = None, limit: int | None = None) -> list[dict]:
    """Rows of a JSONL file, or of a `datasets` split written ``hf:NAME[:CONFIG]:SPLIT``; with ``spec``, checks
    that every row has its fields (one-line error naming them)."""
    path = os.fspath(path)
    if path.startswith(HUB):
        rows = _hub_rows(path, limit)[0]
    elif not os.path.isfile(path):
        raise ToEError(f"data file {path!r} not found: pass a local JSONL file or hf:NAME[:CONFIG]:SPLIT")
    else:
        rows = []
        with open(path) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ToEError(f"{path}:{lineno} is not valid JSON ({e.msg}): fix or remove that line") from None
                if limit is not None and len(rows) >= limit:
                    break
    if not rows:
        raise ToEError(f"{path} has no rows")
    if spec is not None:
        for field in (spec.prompt_field, spec.response_field):
            missing = [i for i, r in enumerate(rows) if field not in r]
            if missing:
                have = sorted(rows[missing[0]].keys())
                raise ToEError(
                    f"{path}: row {missing[0] + 1} has no field {field!r} (it has {have}): "
                    f"pass --prompt_field/--response_field to name the right ones"
                )
    return rows


def file_hash(path: str | os.PathLike) -> str:
    """sha256 of a data file (of the dataset fingerprint for ``hf:`` references)."""
    h = hashlib.sha256()
    path = os.fspath(path)
    if path.startswith(HUB):
        h.update(_hub_rows(path, None)[1].encode())
        return h.hexdigest()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class Encoded:
    """One tokenized example. ``offsets`` are character spans in ``text`` (the appended EOS spans the end)."""

    input_ids: torch.Tensor  # (T,) int64
    loss_mask: torch.Tensor  # (T,) bool, True on response tokens (the ones CE is measured on)
    offsets: torch.Tensor  # (T, 2) int64
    text: str


def encode(tokenizer, prompt: str, response: str, max_length: int = 1024) -> Encoded:
    """Tokenizes ``prompt + response`` in one pass (so ids match how the model sees the text) plus EOS."""
    text = prompt + response
    enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True, truncation=True,
                    max_length=max_length - 1)
    ids = list(enc["input_ids"]) + [tokenizer.eos_token_id]
    offsets = [tuple(o) for o in enc["offset_mapping"]] + [(len(text), len(text))]
    offsets_t = torch.tensor(offsets, dtype=torch.long)
    loss_mask = offsets_t[:, 1] > len(prompt)  # tokens that end inside the response (incl. EOS)
    return Encoded(torch.tensor(ids, dtype=torch.long), loss_mask, offsets_t, text)


def pad_left(seqs: list[torch.Tensor], pad_value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacks 1-D tensors left-padded: returns (B, T) values and (B, T) attention mask."""
    length = max(s.shape[0] for s in seqs)
    out = torch.full((len(seqs), length), pad_value, dtype=seqs[0].dtype)
    mask = torch.zeros(len(seqs), length, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, length - s.shape[0] :] = s
        mask[i, length - s.shape[0] :] = 1
    return out, mask


def align_offsets(base_offsets: torch.Tensor, teacher_offsets: torch.Tensor) -> torch.Tensor:
    """For each base token, the last teacher token that ends at or before the base token's end (-1 if none).

    The teacher's state there has seen no character beyond what the base token has seen, so the alignment never
    leaks future text into the expert signal.
    """
    t_end = teacher_offsets[:, 1].contiguous()
    idx = torch.searchsorted(t_end, base_offsets[:, 1].contiguous(), right=True) - 1
    return idx


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Example indices of global batch ``step``: epochs are seeded permutations, so any step is reproducible on its
    own (exact resume) and ToE and its baselines see the same batches."""
    epoch, pos = divmod(step * batch_size, n)
    order: list[int] = []
    while len(order) < pos + batch_size:  # a batch may run into the next epoch(s)
        order += torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch + len(order) // n)).tolist()
    return order[pos : pos + batch_size]
