"""Checkpoints of a training run (written whole or not at all) and its loss curves."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import sys
from collections.abc import Mapping

import torch

from ..errors import ToEError
from ..files import (
    atomic_save_tensors,
    atomic_torch_save,
    atomic_write_json,
    atomic_write_text,
    load_tensors,
    load_torch,
    read_json,
)

log = logging.getLogger(__name__)


def log_progress(command: str, row: dict, total: int) -> None:
    """One line per logged step for runs without a terminal (nohup, batch jobs), where the progress bar is off."""
    parts = [f"{command}: step {row['step']}/{total}"] + ([f"stage {row['stage']}"] if "stage" in row else [])
    parts += [f"{k} {row[k]:.4f}" for k in ("loss", "ce", "kd", "jsd") if isinstance(row.get(k), float)]
    parts += [f"{k} {row[k]}" for k in ("samples",) if k in row]
    if isinstance(row.get("elapsed_s"), float):
        parts.append(f"{row['elapsed_s']:.0f} s")
    log.info(", ".join(parts))


def peak_memory() -> dict[str, float]:
    """This process's peak memory so far, for a run's summary: resident set (GiB, Linux and macOS) and, where CUDA
    was used, the allocator's peak per process (GiB). A resumed run reports its own process only."""
    out = {}
    try:
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        out["peak_rss_gib"] = round(rss / (2**30 if sys.platform == "darwin" else 2**20), 2)
    except ImportError:  # Windows
        pass
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["peak_cuda_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return out


def logged_step(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


def checkpoint_dir(out: str) -> str:
    return os.path.join(out, "checkpoint")


RESTART = "the checkpoint is damaged: start the run again without --resume (with --overwrite)"


# What a resumed run reads back from its folder: ``--resume --overwrite`` keeps these and replaces the rest.
RESUMED = ("checkpoint", "checkpoint.tmp", "checkpoint.old", "train_args.json", "metrics.jsonl")


def has_checkpoint(out: str) -> bool:
    """Whether ``out`` holds a checkpoint to resume from. A kill between :func:`save_checkpoint`'s two renames
    leaves no ``checkpoint`` but the new one whole in ``checkpoint.tmp`` (its state.json is written last) and the
    one before in ``checkpoint.old``: the newest whole one is put back in place, so the run does not restart."""
    ck = checkpoint_dir(out)
    if not os.path.isdir(ck):
        for found in (ck + ".tmp", ck + ".old"):
            if os.path.isfile(os.path.join(found, "state.json")):
                with contextlib.suppress(FileNotFoundError):  # another process of the run may have done it
                    os.replace(found, ck)
                break
    return os.path.isdir(ck)


def save_checkpoint(out: str, weights: Mapping[str, torch.Tensor], opt: torch.optim.Optimizer, state: dict,
                    what: str = "plug-in") -> None:
    """Writes a checkpoint (the trained ``weights``, the optimizer and ``state``, which holds the step) next to the
    old one, then swaps: a crash leaves the previous checkpoint whole. ``what`` names the weights in errors and
    picks their file (the plug-in's, or an adapter's trainable tensors)."""
    step = state["step"]
    bad = [n for n, t in weights.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise ToEError(f"training stopped at step {step}: the {what}'s {bad[0]} holds NaN or inf values after the "
                       "update (the loss was finite); nothing was saved from this state: lower the learning rates "
                       "and start again with --overwrite")
    tmp = checkpoint_dir(out) + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    atomic_save_tensors(os.path.join(tmp, _weights_file(what)), {n: t.detach() for n, t in weights.items()})
    atomic_torch_save(os.path.join(tmp, "optimizer.pt"), opt.state_dict())
    atomic_write_json(os.path.join(tmp, "state.json"), state)
    old = checkpoint_dir(out) + ".old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.isdir(checkpoint_dir(out)):
        os.replace(checkpoint_dir(out), old)
    os.replace(tmp, checkpoint_dir(out))
    shutil.rmtree(old, ignore_errors=True)


def _weights_file(what: str) -> str:
    return "plugin.safetensors" if what == "plug-in" else "trainable.safetensors"


def load_checkpoint(out: str, what: str = "plug-in") -> tuple[dict[str, torch.Tensor], dict, dict]:
    """(weights, optimizer state, state) of ``out``'s checkpoint; a damaged one is a one-line error."""
    ck = checkpoint_dir(out)
    return (load_tensors(os.path.join(ck, _weights_file(what)), RESTART),
            load_torch(os.path.join(ck, "optimizer.pt"), RESTART), read_json(os.path.join(ck, "state.json"), RESTART))


def keep_logged_rows(metrics_path: str, step: int) -> None:
    """Drops the metrics rows logged after the checkpoint at ``step`` (a row cut by a kill goes too)."""
    if os.path.isfile(metrics_path):
        with open(metrics_path) as f:
            rows = [r for r in f if logged_step(r) <= step]
        atomic_write_text(metrics_path, "".join(rows))


def plot_curves(metrics_path: str, png: str) -> str | None:
    """Loss curves per stage from metrics.jsonl -> PNG; returns the path (None without matplotlib rows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not os.path.isfile(metrics_path):  # a checkpoint before the first logged row
        return None
    with open(metrics_path) as f:
        rows = [json.loads(r) for r in f]
    if not rows:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    a = [r for r in rows if r["stage"] == "A"]
    b = [r for r in rows if r["stage"] != "A"]
    if a:
        axes[0].plot([r["step"] for r in a], [r["loss"] for r in a])
    axes[0].set(title="Stage A: route BCE", xlabel="step")
    if b:
        for key in ("ce", "kd", "jsd"):
            pts = [(r["step"], r[key]) for r in b if r.get(key) is not None]
            if pts:
                axes[1].plot(*zip(*pts), label=key)
        axes[1].legend()
    axes[1].set(title="Stage B/C: distillation", xlabel="step")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png
