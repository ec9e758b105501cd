"""Checkpoints of a training run (written whole or not at all) and its loss curves."""

from __future__ import annotations

import json
import math
import os
import shutil

import torch

from ..config import ToEError
from ..io import (
    atomic_save_tensors,
    atomic_torch_save,
    atomic_write_json,
)
from ..model import ToEModel


def logged_step(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


def checkpoint_dir(out: str) -> str:
    return os.path.join(out, "checkpoint")


RESTART = "the checkpoint is damaged: start the run again without --resume (with --overwrite)"


def save_checkpoint(out: str, model: ToEModel, opt: torch.optim.Optimizer, step: int, stage: str) -> None:
    """Writes a checkpoint next to the old one, then swaps: a crash leaves the previous checkpoint whole."""
    bad = [n for n, t in model.plugin.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise ToEError(f"training stopped at step {step}: the plug-in's {bad[0]} holds NaN or inf values after the "
                       "update (the loss was finite); nothing was saved from this state: lower the learning rates "
                       "and start again with --overwrite")
    tmp = checkpoint_dir(out) + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    atomic_save_tensors(os.path.join(tmp, "plugin.safetensors"), model.plugin.state_dict())
    atomic_torch_save(os.path.join(tmp, "optimizer.pt"), opt.state_dict())
    atomic_write_json(os.path.join(tmp, "state.json"), {"step": step, "stage": stage})
    old = checkpoint_dir(out) + ".old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.isdir(checkpoint_dir(out)):
        os.replace(checkpoint_dir(out), old)
    os.replace(tmp, checkpoint_dir(out))
    shutil.rmtree(old, ignore_errors=True)


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
