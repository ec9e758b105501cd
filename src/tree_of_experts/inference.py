"""Batched text generation with a base + plug-in (the library side of `toe generate`)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch

from .errors import ToEError
from .data import FORMATS, read_rows
from .files import atomic_write_text
from .hf.layers import input_device
from .plugin_folder import ADAPTER_DIR


@dataclass(frozen=True)
class Sampling:
    """How completions are decoded: greedy (``temperature`` 0, the default) or sampled.

    Attributes:
        temperature: softmax temperature; 0 is greedy decoding.
        top_p: nucleus mass kept when sampling (1: all tokens). The model's own ``generation_config.top_k`` is
            switched off so that these two numbers are the whole sampling rule.
        num_samples: completions per prompt (sampling only).
        seed: seed of the sampling draws (recorded; in `toe eval` and `toe traces` each batch draws from its own
            stream, a function of ``seed`` and its first item's index, so the same seed and batch size give the same
            samples, also when a run resumes).
    """

    temperature: float = 0.0
    top_p: float = 1.0
    num_samples: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ToEError(f"temperature={self.temperature}: use 0 for greedy decoding or a positive value to sample")
        if not 0 < self.top_p <= 1:
            raise ToEError(f"top_p={self.top_p}: use a nucleus mass in (0, 1]")
        if self.num_samples < 1:
            raise ToEError(f"num_samples={self.num_samples}: use 1 or more")
        if self.greedy and (self.num_samples > 1 or self.top_p < 1):
            raise ToEError(f"num_samples={self.num_samples}, top_p={self.top_p} with greedy decoding would repeat one "
                           "completion: pass --temperature > 0 (e.g. 0.7) to sample")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generate_kwargs(self) -> dict:
        """Keyword arguments for ``model.generate``."""
        if self.greedy:
            return {"do_sample": False}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "top_k": 0,
                "num_return_sequences": self.num_samples}

    def record(self) -> dict:
        """What a results file records about decoding."""
        return {"decoding": "greedy"} if self.greedy else {"decoding": "sample", "sampling": asdict(self)}


GREEDY = Sampling()


@contextlib.contextmanager
def seeded(seed: int, device: torch.device | str) -> Iterator[None]:
    """The global torch RNG (which ``generate`` samples from) seeded for the block and restored after it."""
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def read_prompts(prompt: str | None, prompts_file: str | None) -> list[str]:
    """One prompt, or one per line of a text file (or the ``prompt`` field of each row of a data file: JSONL,
    JSON, CSV, parquet)."""
    if (prompt is None) == (prompts_file is None):
        raise ToEError("give exactly one of --prompt TEXT or --prompts_file FILE")
    if prompt is not None:
        return [prompt]
    if not os.path.isfile(prompts_file):
        raise ToEError(f"prompts file {prompts_file!r} not found")
    if os.path.splitext(prompts_file)[1].lower() in FORMATS:
        rows = read_rows(prompts_file)
        bad = next((i for i, r in enumerate(rows) if not isinstance(r.get("prompt"), str)), None)
        if bad is not None:
            raise ToEError(f"{prompts_file}: row {bad + 1} has no text 'prompt' field: give every row one (or pass a "
                           "plain text file, one prompt a line)")
        return [r["prompt"] for r in rows]
    with open(prompts_file) as f:
        return [line.rstrip("\n") for line in f if line.strip()]


@torch.no_grad()
def generate_texts(
    model, tokenizer, prompts: list[str], max_new_tokens: int = 128, batch_size: int = 8,
    sampling: Sampling = GREEDY, **gen
) -> list[str]:
    """Completions for ``prompts``, batched with left padding: greedy, or ``sampling.num_samples`` sampled ones per
    prompt, consecutive (``[p0 s0, p0 s1, ..., p1 s0, ...]``). Sampling draws from the global RNG: seed it around
    the call (`seeded`). ``gen``: more ``generate`` arguments (``stop_strings``, ...)."""
    tokenizer.padding_side = "left"
    device = input_device(model)
    gen = {**sampling.generate_kwargs(), **gen}
    if gen.get("stop_strings"):
        gen["tokenizer"] = tokenizer  # transformers needs it to match stop strings
    out: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        enc = tokenizer(chunk, return_tensors="pt", padding=True).to(device)
        ids = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, **gen)
        out += tokenizer.batch_decode(ids[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return out


class GenerationLog:
    """Finished batches of a long generation run, appended to a JSONL file as they finish, so that a rerun with the
    same settings (``--resume``) generates only the batches it has not got.

    Each line is ``{"key": ..., "start": ..., "prompts": ..., "texts": [...]}``: ``key`` fingerprints the settings
    (the system, its weights, decoding), ``prompts`` hashes the batch's prompts, so a batch is reused only for the
    same prompts at the same place under the same settings. A line cut off by the interruption is dropped on open.
    ``path`` None keeps nothing (the run is not resumable).
    """

    def __init__(self, path: str | None, settings: dict, tag: str = "") -> None:
        self.path, self.key, self.tag = path, _digest(settings), tag
        self.settings = json.loads(json.dumps(settings, sort_keys=True, default=str))
        self.done: dict[tuple[int, str], list[str]] = {}
        self.reused = 0
        if not (path and os.path.exists(path)):
            return
        with open(path) as f:
            text = f.read()
        lines = text.split("\n")
        good, other = [], None
        for line in lines:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # the empty tail, or a line the interruption cut off
            good.append(line)
            if row.get("tag", "") != tag:
                continue  # another system's batches in the same file
            if row.get("key") == self.key:
                self.done[(row["start"], row["prompts"])] = row["texts"]
            else:
                other = row.get("settings") or {}
        if len(good) != sum(1 for line in lines if line) or (text and not text.endswith("\n")):
            atomic_write_text(path, "".join(line + "\n" for line in good))  # appends must follow a whole line
        if other is not None and not self.done:
            changed = sorted(k for k, v in _flat(self.settings).items() if _flat(other).get(k) != v) or ["unknown"]
            raise ToEError(f"--resume: {path} holds finished batches of this run made with other settings "
                           f"({', '.join(changed)}): rerun with those, or delete {path} to start over")

    def get(self, start: int, prompts: list[str]) -> list[str] | None:
        texts = self.done.get((start, _digest(prompts)))
        self.reused += texts is not None
        return texts

    def put(self, start: int, prompts: list[str], texts: list[str]) -> None:
        if not self.path:
            return
        line = json.dumps({"key": self.key, "tag": self.tag, "start": start, "prompts": _digest(prompts),
                           "texts": texts, "settings": self.settings})
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)  # `toe traces --out new/folder/t.jsonl`
        with open(self.path, "a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())

    def close(self) -> None:
        """The run finished and wrote its results: the log goes."""
        if self.path and os.path.exists(self.path):
            os.remove(self.path)


def _flat(d: dict, prefix: str = "") -> dict:
    """{"args": {"limit": 4}} -> {"args.limit": 4}: names what differs between two runs' settings."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v and prefix.count(".") < 1:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# What a run folder records about how it was made, beside the model it holds: not part of the model, so a copy of
# the folder with more or fewer of these (a kept or restored run) is the same model.
RUN_RECORDS = ("README.md", "metrics.jsonl", "curves.png", "command.sh", "inspect.json", "train_summary.json",
               "baseline_summary.json", "train_args.json", "baseline_args.json")


def folder_fingerprint(path: str | None) -> dict | None:
    """What a model/plug-in folder holds, so that a log made with other weights is not reused: each file's size and
    a hash of its content (of its first and last MiB for files over 8 MiB: a base's shards), and so for a plug-in's
    ``base_adapter`` folder; run records (:data:`RUN_RECORDS`, hidden files) and other folders (checkpoints, a
    control's extraction) are left out. It reads the same on another machine that holds the same files."""
    if not path:
        return None
    if not os.path.isdir(path):
        return {"name": path}
    out = {}
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if name.startswith(".") or name in RUN_RECORDS:
            continue
        if os.path.isfile(full):
            out[name] = _file_digest(full)
        elif name == ADAPTER_DIR and os.path.isdir(full):
            out[name] = folder_fingerprint(full)
    return out


def _file_digest(path: str, whole: int = 8 << 20, part: int = 1 << 20) -> list:
    size, h = os.path.getsize(path), hashlib.sha256()
    with open(path, "rb") as f:
        if size <= whole:
            h.update(f.read())
        else:
            h.update(f.read(part))
            f.seek(size - part)
            h.update(f.read(part))
    return [size, h.hexdigest()[:16]]


