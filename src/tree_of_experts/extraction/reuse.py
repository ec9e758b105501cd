"""`toe extract --reuse_capture SOURCE`: another extraction's shards as this one's capture (layer-set sweeps).

SOURCE must have been captured from the same models, data and capture settings; this extraction asks for a subset
of its (layer, teacher layer) pairs, and each of its shards is SOURCE's shard with those pairs alone (renumbered
0..). The teacher never loads; the fusion maps and the tree are built anew from the subset.
"""

from __future__ import annotations

import os

import torch

from ..errors import ToEError
from ..files import load_tensors, read_json
from .store import CORRUPT, CORRUPT_SHARD


def reusable_capture(source: str, early: dict) -> dict:
    """The settings of SOURCE, an extraction whose shards may serve this one: every capture setting but the layers
    must match ``early`` (this extraction's); its shards are checked as they are read."""
    if not os.path.isfile(os.path.join(source, "run.json")):
        raise ToEError(f"--reuse_capture {source} is not a `toe extract` folder (no run.json): give the folder of an "
                       "extraction of the same models and data")
    run = read_json(os.path.join(source, "run.json"), CORRUPT)
    changed = sorted(k for k in early if k not in ("layers", "teacher_layers", "state_budget")
                     and run.get(k) != early[k])
    if changed:
        raise ToEError(f"--reuse_capture {source} was captured with other settings ({', '.join(changed)}): give the "
                       "same models, data and capture settings, or extract without --reuse_capture")
    return run


def reused_pairs(path: str, source: dict, layers: list[int], teacher_layers: list[int]) -> list[int]:
    """Where each asked (layer, teacher layer) pair sits among the ones the source at PATH captured."""
    captured = list(zip(source["layers"], source["teacher_layers"]))
    asked = list(zip(layers, teacher_layers))
    missing = [p for p in asked if p not in captured]
    if missing:
        raise ToEError(f"--reuse_capture {path} holds the (layer, teacher layer) pairs {captured}, not {missing}: ask "
                       "for layers among those, or extract without --reuse_capture")
    return [captured.index(p) for p in asked]


def reused_source(path: str | None, early: dict, layer_pairs: tuple[list[int], list[int]] | None) -> dict | None:
    """The run.json of the extraction at PATH (None without ``--reuse_capture``), checked before any weights load:
    its capture settings against ``early``, and the pairs asked for (``layer_pairs``, resolved from the configs;
    None where they do not give the layer counts) against its own."""
    if not path:
        return None
    source = reusable_capture(path, early)
    if layer_pairs is None:
        raise ToEError("the models' configs do not give their layer counts: pass --layers and --teacher_layers "
                       "with --reuse_capture")
    reused_pairs(path, source, *layer_pairs)
    return source


def check_same_base(path: str, source: dict, base_arch: str) -> None:
    """Refuses a source captured from a base of another architecture than the one loaded (``base_arch``)."""
    if source.get("base_arch") != base_arch:
        raise ToEError(f"--reuse_capture {path} was captured from a base of another architecture: give an "
                       "extraction of this base, or extract without --reuse_capture")


def layer_subset(source: str, shard: str, which: list[int], layers: list[int]) -> dict[str, torch.Tensor]:
    """SOURCE's shard with only the layer pairs at indices WHICH (renumbered 0..; ``layers`` the injection layers
    they are), everything else as captured."""
    path = os.path.join(source, "shards", shard)
    if not os.path.isfile(path):
        raise ToEError(f"--reuse_capture {source} lacks shards/{shard}: finish that extraction first (rerun its "
                       "`toe extract` command), or extract without --reuse_capture")
    tensors = load_tensors(path, CORRUPT_SHARD)
    out = {k: v for k, v in tensors.items() if not k.startswith(("base.", "teacher."))}
    if "teacher.0" not in tensors:  # a light shard: the base's state of the lowest asked layer, where it was kept
        low = min(range(len(which)), key=lambda j: layers[j])
        if f"base.{which[low]}" in tensors:
            out[f"base.{low}"] = tensors[f"base.{which[low]}"]
        return out
    for j, i in enumerate(which):
        for side in ("base", "teacher"):
            if f"{side}.{i}" not in tensors:
                raise ToEError(f"{path} lacks {side}.{i}: {CORRUPT_SHARD}")
            out[f"{side}.{j}"] = tensors[f"{side}.{i}"]
    return out
