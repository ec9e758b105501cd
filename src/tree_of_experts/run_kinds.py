"""The kinds of run an output folder can hold (an extraction, a plug-in, a training run, an evaluation...): the
files each command writes at the top of its folder, and the record (``.toe-files.json``) that says which one a folder
holds."""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os

# -- output folders ------------------------------------------------------------------------------------------------
# What ToE commands write at the top of an output folder. A folder holding any of these holds a run; a command
# replaces it only when told (--overwrite), continues it only when it is its own run (--resume, or an extraction
# rerun with the same settings). Other files (a README, the user's notes, a data file) neither block nor get removed.
RUN_FILES = {
    "extract": ("run.json", "manifest.json", "shards", "projector.safetensors", "route_data.safetensors",
                "summary.json", "summary.md", "toe_config.json", "toe_model.safetensors", "timings-*.json",
                "build.json"),
    "train": ("train_args.json", "metrics.jsonl", "checkpoint", "checkpoint.tmp", "checkpoint.old", "snapshots",
              "train_summary.json", "curves.png", "toe_config.json", "toe_model.safetensors"),
    "baseline": ("baseline_summary.json", "adapter_model.safetensors", "adapter_config.json", "model.safetensors",
                 "model-*-of-*.safetensors", "model.safetensors.index.json", "train_args.json", "metrics.jsonl",
                 "snapshots",
                 "checkpoint", "checkpoint.tmp", "checkpoint.old", "train_summary.json", "curves.png",
                 "toe_config.json", "toe_model.safetensors"),
    "eval": ("metrics.json", "base.jsonl", "toe.jsonl", "teacher.jsonl", "lora.jsonl", "sft.jsonl",
             "generations.partial.jsonl"),
    "oracle": ("oracle.json", "oracle.md", "generation.jsonl", "metrics.json", "base.jsonl", "teacher.jsonl",
               "toe.jsonl", "O1-map.jsonl", "O2-routing.jsonl", "static-mean.jsonl", "O1-ridge-*.jsonl"),
    "report": ("report.json", "report.md", "report.png", "leaf_usage.json", "usage.png", "sweep.png", "pairs.json"),
    "bench": ("bench.json", "bench.md", "bench.png"),
}


# The file that says a folder holds a run of that command which --resume (or a rerun) may continue.
RESUME_MARKER = {"train": ("train_args.json",), "baseline": ("baseline_args.json", "train_args.json"),
                 "extract": ("run.json",), "eval": ("generations.partial.jsonl",)}


FINISHED = {"train": "train_summary.json", "baseline": "baseline_summary.json", "eval": "metrics.json"}


RESUMES_BY_RERUN = ("extract",)  # an extraction continues whenever it is rerun with the same settings


REPLACES_ITSELF = ("report",)  # a report is a view of eval folders: regenerating it loses nothing


RECORD_NAME = ".toe-files.json"  # which command's run a folder holds and its files (hidden, like the lock)


SAME_KIND = {"rebuild": "extract"}  # commands whose folders are one kind of run


# The files that say which kind of run a folder holds when it has no record (folders written before the record
# existed, a run killed before it wrote one), most specific first: a baseline's folder holds a train run's files
# too, every trained folder a plug-in's.
KIND_MARKERS = (
    ("baseline", ("baseline_args.json", "baseline_summary.json")),
    ("train", ("train_args.json", "train_summary.json")),
    ("extract", ("run.json", "build.json", "manifest.json", "route_data.safetensors", "projector.safetensors")),
    ("oracle", ("oracle.json", "oracle.md", "O2-routing.jsonl")),
    ("report", ("report.json", "report.md")),
    ("bench", ("bench.json", "bench.md")),
    ("eval", ("metrics.json", "generations.partial.jsonl")),
    ("export", ("modeling_toe.py", "configuration_toe.py")),
    ("checkpoint", ("state.json", "plugin.safetensors", "trainable.safetensors")),  # `toe train`'s, not Trainer's
    ("plugin", ("toe_config.json", "toe_model.safetensors")),
)


KINDS = {"extract": "an extraction (`toe extract`)", "plugin": "a plug-in folder (save_pretrained)",
         "checkpoint": "a training checkpoint", "export": "an exported model (`toe export`)"}


def kind_of(command: str) -> str:
    """The kind of run a command's output folder holds (`toe rebuild` writes an extraction)."""
    return SAME_KIND.get(command, command)


def describe(kind: str) -> str:
    return KINDS.get(kind, f"a `toe {kind}` run")


def folder_kind(folder: str | os.PathLike) -> tuple[str | None, list[str]]:
    """(the kind of run ``folder`` holds, the files that say so): its record (RECORD_NAME) where a command left
    one, else the first of KIND_MARKERS it holds; (None, []) for a folder holding no ToE run."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        return None, []
    names = set(os.listdir(folder))
    with contextlib.suppress(OSError, ValueError, AttributeError):
        with open(os.path.join(folder, RECORD_NAME)) as f:
            kind = json.load(f).get("command")
        if isinstance(kind, str) and kind in {k for k, _ in KIND_MARKERS}:
            markers = dict(KIND_MARKERS)[kind]
            own = [m for m in markers if m in names] + [n for n in run_files(folder, kind) if n not in markers]
            return kind, own or [RECORD_NAME]
    for kind, markers in KIND_MARKERS:
        hits = [m for m in markers if m in names]
        if hits:
            return kind, hits
    return None, []


def top_stats(folder: str) -> dict[str, tuple[int, int]]:
    """{name: (mtime_ns, size)} of the visible entries at the top of ``folder``: whether a run changed it."""
    out = {}
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder):
            if not entry.name.startswith("."):
                with contextlib.suppress(OSError):
                    st = entry.stat(follow_symlinks=False)
                    out[entry.name] = (st.st_mtime_ns, st.st_size)
    return out


def run_files(out: str | os.PathLike, command: str | None = None) -> list[str]:
    """Names at the top of ``out`` that a ToE command writes (``command``'s only, or any command's)."""
    out = os.fspath(out)
    if not os.path.isdir(out):
        return []
    patterns = set(RUN_FILES.get(kind_of(command), RUN_FILES.get(command, ()))) if command else {p for ps in RUN_FILES.values() for p in ps}
    return sorted(name for name in os.listdir(out) if any(fnmatch.fnmatchcase(name, p) for p in patterns))


def same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)
