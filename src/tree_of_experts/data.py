"""Reasoning data: rows of a data file (JSONL, JSON, CSV, parquet, a `datasets` split) -> prompt/response text ->
token ids with a response (loss) mask."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch

from .errors import ToEError

logger = logging.getLogger(__name__)
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
FORMATS = {".jsonl": None, ".json": "json", ".csv": "csv", ".parquet": "parquet"}  # extension -> datasets builder
SURROGATE = re.compile("[\ud800-\udfff]")  # half of a UTF-16 pair: no UTF-8 encoding, tokenizers refuse it


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


def _load_split(ref: str, limit: int | None):
    """The `datasets.Dataset` of ``hf:NAME:SPLIT`` or ``hf:NAME:CONFIG:SPLIT``: a hub id, a local folder of data
    files, or a folder written by ``save_to_disk`` (a DatasetDict's, or a Dataset's: ``hf:FOLDER`` or, naming the
    split it was saved from, ``hf:FOLDER:SPLIT``)."""
    parts = ref[len(HUB):].split(":")
    saved = os.path.isfile(os.path.join(parts[0], "state.json"))  # Dataset.save_to_disk: one split, no dict
    if not all(parts) or not (len(parts) in (2, 3) or saved and len(parts) == 1) or saved and len(parts) == 3:
        raise ToEError(f"{ref!r}: write hf:NAME:SPLIT or hf:NAME:CONFIG:SPLIT (e.g. hf:openai/gsm8k:main:test), or "
                       "hf:FOLDER for a folder Dataset.save_to_disk wrote")
    name, config, split = parts[0], parts[1] if len(parts) == 3 else None, parts[-1]
    try:
        import datasets

        if saved:
            ds = datasets.load_from_disk(name)
        elif os.path.isfile(os.path.join(name, "dataset_dict.json")):  # DatasetDict.save_to_disk
            ds = datasets.load_from_disk(name)[split]
        else:
            return datasets.load_dataset(name, config, split=split if limit is None else f"{split}[:{limit}]")
    except Exception as e:  # noqa: BLE001 (datasets raises many types: network, missing config, bad split)
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ToEError(f"could not load {ref!r} with datasets ({reason}): check name, config and split, or pass a "
                       "local data file") from None
    if saved and len(parts) == 2 and ds.split is not None and str(ds.split) != split:
        raise ToEError(f"{ref!r}: {name} holds the split {str(ds.split)!r} alone: write hf:{name} (or "
                       f"hf:{name}:{ds.split})")
    return ds.select(range(min(limit, len(ds)))) if limit is not None else ds


def _load_file(path: str, builder: str, limit: int | None):
    """A local JSON, CSV or parquet file as a `datasets.Dataset`. CSV cells stay text (no number or NA guessing: an
    empty cell is "", which the row checks then name)."""
    try:
        from datasets import Features, Value, load_dataset

        kwargs = {}
        if builder == "csv":
            with open(path, encoding="utf-8-sig", newline="") as f:
                header = next(csv.reader(f), [])
            kwargs = {"features": Features({c: Value("string") for c in header}), "keep_default_na": False}
        ds = load_dataset(builder, data_files=os.path.abspath(path), split="train", **kwargs)
    except Exception as e:  # noqa: BLE001 (pyarrow/pandas parse errors come in many types)
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ToEError(f"could not read {path} as {builder} ({reason}): fix the file, or convert it to JSONL") from None
    return ds.select(range(min(limit, len(ds)))) if limit is not None else ds


def _jsonl_records(path: str) -> Iterator[tuple[str, Any, str | None]]:
    """(``path:line``, row, why it is unreadable or None) for each non-blank line. Decoding is done here, not by
    `open`, so that a bad byte is named by its line instead of a traceback; a leading byte-order mark is how some
    editors mark UTF-8 and is dropped."""
    with open(path, encoding="utf-8-sig", errors="surrogateescape") as f:
        for lineno, line in enumerate(f, 1):
            where = f"{path}:{lineno}"
            if not line.strip():
                continue
            if SURROGATE.search(line):  # undecodable bytes, escaped by surrogateescape
                yield where, None, f"{where} is not valid UTF-8: re-save the file as UTF-8 or remove that line"
            elif line.startswith("\ufeff"):
                yield where, None, f"{where} starts with a UTF-8 byte-order mark (files joined?): remove it"
            else:
                try:
                    yield where, json.loads(line), None
                except json.JSONDecodeError as e:
                    yield where, None, f"{where} is not valid JSON ({e.msg}): fix or remove that line"


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({value})"
    if isinstance(value, (int, float)):
        return f"a number ({value})"
    return {list: "a list", dict: "an object"}.get(type(value), type(value).__name__)


def row_problem(row: Any, where: str, spec: DataSpec | None) -> str | None:
    """Why ``row`` cannot be used, as one line naming ``where`` and the fix; None when it is fine.

    Refused: a row that is not an object; with ``spec``, a missing prompt/response field, one that is not text
    (``str(None)`` would be scored as the text "None"), an empty prompt or an empty response (scored as CE 0, it
    pulls the mean down); any text holding a lone surrogate (the tokenizer cannot encode it)."""
    if not isinstance(row, dict):
        return f"{where} is {_describe(row)}, not an object: write one {{\"field\": value, ...}} object per row"
    for field in (spec.prompt_field, spec.response_field) if spec is not None else ():
        if field not in row:
            return (f"{where} has no field {field!r} (it has {sorted(row)}): pass --prompt_field/--response_field "
                    "to name the right ones")
        if not isinstance(row[field], str):
            return f"{where}: field {field!r} is {_describe(row[field])}, not text: write it as a string or drop the row"
    for field, what in ((spec.prompt_field, "prompt"), (spec.response_field, "response")) if spec is not None else ():
        if not row[field].strip():
            return f"{where}: field {field!r} is empty: write the {what} or drop the row"
    for field, value in row.items():
        if isinstance(value, str) and SURROGATE.search(value):
            return (f"{where}: field {field!r} holds a lone surrogate (half of a UTF-16 pair, e.g. \\ud800): fix "
                    "that escape or drop the row")
    return None


def scan_rows(path: str | os.PathLike, spec: DataSpec | None = None, limit: int | None = None,
              skip_bad: bool = False) -> tuple[list[dict], list[str]]:
    """Rows of a data file and, with ``skip_bad``, one line per row left out (`row_problem`'s reason).

    The format comes from the name: ``.jsonl`` (read line by line here), ``.json``, ``.csv`` or ``.parquet``
    (through `datasets`), or ``hf:NAME[:CONFIG]:SPLIT`` (a hub dataset, a local folder of data files or a
    ``save_to_disk`` folder). Without ``skip_bad`` the first bad row raises its line as a ToEError. ``limit``: the
    first ``limit`` usable rows.
    """
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    if path.startswith(HUB):
        ds = _load_split(path, None if skip_bad else limit)
        records = ((f"{path} row {i + 1}", dict(r), None) for i, r in enumerate(ds))
    elif ext not in FORMATS:
        raise ToEError(f"data file {path!r} has an unknown format: pass a .jsonl, .json, .csv or .parquet file, or "
                       "hf:NAME[:CONFIG]:SPLIT for a hub dataset or a local dataset folder")
    elif not os.path.isfile(path):
        raise ToEError(f"data file {path!r} not found: pass a local data file or hf:NAME[:CONFIG]:SPLIT")
    elif FORMATS[ext] is None:
        records = _jsonl_records(path)
    else:
        ds = _load_file(path, FORMATS[ext], None if skip_bad else limit)
        records = ((f"{path} row {i + 1}", dict(r), None) for i, r in enumerate(ds))
    rows: list[dict] = []
    skipped: list[str] = []
    for where, row, unreadable in records:
        problem = unreadable or row_problem(row, where, spec)
        if problem is None:
            rows.append(row)
        elif skip_bad:
            skipped.append(problem)
        else:
            raise ToEError(problem)
        if limit is not None and len(rows) >= limit:
            break
    if not rows:
        first = f" ({len(skipped)} skipped, the first: {skipped[0]})" if skipped else ""
        raise ToEError(f"{path} has no rows{first}")
    return rows, skipped


def read_rows(path: str | os.PathLike, spec: DataSpec | None = None, limit: int | None = None,
              skip_bad: bool = False) -> list[dict]:
    """`scan_rows`' rows; skipped rows are logged as a count and the first reason."""
    rows, skipped = scan_rows(path, spec, limit, skip_bad)
    if skipped:
        logger.warning("%s: skipped %d bad rows (the first: %s)", os.fspath(path), len(skipped), skipped[0])
    return rows


read_jsonl = read_rows  # the name train, extract, baseline and oracle import (it reads every format)


def file_hash(path: str | os.PathLike) -> str:
    """sha256 of a data file (of the dataset fingerprint for ``hf:`` references)."""
    h = hashlib.sha256()
    path = os.fspath(path)
    if path.startswith(HUB):
        h.update(_load_split(path, None)._fingerprint.encode())
        return h.hexdigest()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class Encoded:
    """One tokenized example. ``offsets`` are character spans in ``text`` (the appended EOS: one past its end)."""

    input_ids: torch.Tensor  # (T,) int64
    loss_mask: torch.Tensor  # (T,) bool, True on response tokens (the ones CE is measured on)
    offsets: torch.Tensor  # (T, 2) int64
    text: str
    cut: bool = False  # tokens beyond max_length were dropped
    whole_length: int = 0  # tokens of the example uncut (prompt + response + EOS)
    prompt_length: int = 0  # of those, the prompt's (the tokens that end inside it)

    @property
    def response_cut_away(self) -> bool:
        """The prompt fills max_length: of the response only the appended EOS is left (nothing to train or score)."""
        return self.cut and int(self.loss_mask.sum()) <= 1


def encode(tokenizer, prompt: str, response: str, max_length: int = 1024) -> Encoded:
    """Tokenizes ``prompt + response`` in one pass (so ids match how the model sees the text) plus EOS, keeping at
    most ``max_length`` tokens."""
    text = prompt + response
    enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True, truncation=True,
                    max_length=max_length - 1)
    ids = list(enc["input_ids"]) + [tokenizer.eos_token_id]
    # EOS comes after every character: it ends one past the text, so no text token aligns to a state that saw it
    offsets = [tuple(o) for o in enc["offset_mapping"]] + [(len(text), len(text) + 1)]
    offsets_t = torch.tensor(offsets, dtype=torch.long)
    loss_mask = offsets_t[:, 1] > len(prompt)  # tokens that end inside the response (incl. EOS)
    whole, prompt_length = len(ids), int((~loss_mask).sum())
    if len(ids) == max_length:  # only a text that fills the budget can have been cut: tokenize it in full to know
        full = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
        whole = len(full["input_ids"]) + 1
        prompt_length = sum(1 for _, end in full["offset_mapping"] if end <= len(prompt))
    return Encoded(torch.tensor(ids, dtype=torch.long), loss_mask, offsets_t, text, whole > max_length, whole,
                   prompt_length)


def responses_cut_away(encoded: list[Encoded], max_length: int, noun: str = "row",
                       part: str = "response") -> tuple[list[int], str]:
    """The examples whose prompt fills ``max_length`` (nothing of their ``part`` is left to train on or score, only
    the appended EOS), by index, and the one line that says so ("" when there are none): their count, the first,
    and the max_length that keeps part of each and all of each. `toe train`, `toe baseline` and `toe eval` refuse
    them (training can skip them on request)."""
    bad = [i for i, e in enumerate(encoded) if e.response_cut_away]
    if not bad:
        return [], ""
    some = max(encoded[i].prompt_length for i in bad) + 2  # the prompt, one token of the response, EOS
    whole = max(encoded[i].whole_length for i in bad)
    return bad, (f"{len(bad)} of {len(encoded)} {noun}s have a prompt that fills max_length={max_length} tokens, so "
                 f"nothing of their {part} is left (the first is {noun} {bad[0] + 1}): raise --max_length to at "
                 f"least {some} ({whole} keeps every one whole)")


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
