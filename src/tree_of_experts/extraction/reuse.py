"""`toe extract --reuse_capture SOURCE`: another extraction's shards as this one's capture (layer-set sweeps).

SOURCE must have been captured from the same models, data and capture settings; this extraction asks for a subset
of its (layer, teacher layer) pairs, and each of its shards is SOURCE's shard with those pairs alone (renumbered
0..). The teacher never loads; the fusion maps and the tree are built anew from the subset.

A disk budget (``--max_disk``/``--state_tokens``) over a SOURCE that kept every example's states samples it as a
fresh capture would: the plan picks the sample, and each shard is gathered example by example from SOURCE's (the
sample's full shards, then light ones) — a sweep over budgets from one capture. A SOURCE that kept a sample only
gives that sample, and a budget over it is refused.
"""

from __future__ import annotations

import os

import torch

from ..errors import ToEError
from ..files import read_json
from .store import CORRUPT, CORRUPT_SHARD, Extraction, shard_keys


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


def reused_source(path: str | None, early: dict, layer_pairs: tuple[list[int], list[int]] | None,
                  sampled: bool = False) -> dict | None:
    """The run.json of the extraction at PATH (None without ``--reuse_capture``), checked before any weights load:
    its capture settings against ``early``, the pairs asked for (``layer_pairs``, resolved from the configs; None
    where they do not give the layer counts) against its own, and a disk budget (``sampled``) against its sample."""
    if not path:
        return None
    source = reusable_capture(path, early)
    if sampled and source.get("state_examples") is not None:
        raise ToEError(f"--reuse_capture {path} kept the states of a sample of its examples only: drop "
                       "--max_disk/--state_tokens (its sample is taken as it is), or reuse an extraction that kept "
                       "every example's states")
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
    they are), everything else as captured; only what is kept is read (not every pair of a many-layer source)."""
    from safetensors import safe_open

    path = os.path.join(source, "shards", shard)
    if not os.path.isfile(path):
        raise ToEError(f"--reuse_capture {source} lacks shards/{shard}: finish that extraction first (rerun its "
                       "`toe extract` command), or extract without --reuse_capture")
    keys = shard_keys(path)  # (an unreadable header: one line naming the fix)
    full = "teacher.0" in keys
    low = min(range(len(which)), key=lambda j: layers[j])
    if not full and f"base.{which[low]}" not in keys:  # a light shard kept without the low state
        low = None
    names = _kept_keys(path, keys, which, full, low)
    try:
        with safe_open(path, "pt") as f:
            return {name: f.get_tensor(k) for k, name in names.items()}
    except Exception as e:  # noqa: BLE001 (safetensors raises its own error types for a damaged file)
        raise ToEError(f"{path} is unreadable ({e}): {CORRUPT_SHARD}") from None


def _kept_keys(path: str, keys: set[str], which: list[int], full: bool, low: int | None) -> dict[str, str]:
    """{key in the source shard at PATH: key in this extraction's} of what a reused shard keeps: every token field,
    and the asked pairs' states (``which``: their indices among the source's, renumbered 0..) — every pair's base
    and teacher states for a ``full`` shard, for a light one the base's state at pair ``low`` alone (None: none).
    A state asked for that the shard (``keys``) lacks is refused in one line."""
    keep = {f"{side}.{i}": f"{side}.{j}" for j, i in enumerate(which) for side in ("base", "teacher")} if full else \
        ({f"base.{which[low]}": f"base.{low}"} if low is not None else {})
    lost = sorted(set(keep) - keys)
    if lost:
        raise ToEError(f"{path} lacks {lost[0]}: {CORRUPT_SHARD}")
    return {k: keep.get(k, k) for k in keys if not k.startswith(("base.", "teacher.")) or k in keep}


def source_index(source: str, examples: list[int]) -> dict[int, tuple[str, int, int]]:
    """Where each example sits in SOURCE's shards, {example: (shard path, first row, end row)}, read from each
    shard's ``offsets`` and ``example`` columns alone; a missing or cut shard, or one of ``examples`` (this
    extraction's) that SOURCE lacks, is refused first."""
    ex = Extraction(source)
    damaged = ex.damaged_shards()
    if damaged:
        raise ToEError(f"--reuse_capture {source} lacks or holds damaged {damaged[0]}: finish or repair that "
                       "extraction first (rerun its `toe extract` command), or extract without --reuse_capture")
    index = {r.example: (r.path, *r.rows) for r in ex.example_refs()}
    missing = [i for i in examples if i not in index]
    if missing:
        raise ToEError(f"--reuse_capture {source} lacks example {missing[0]} in its shards: give a finished "
                       "extraction of the same data, or extract without --reuse_capture")
    return index


def resampled_shard(index: dict[int, tuple[str, int, int]], examples: list[int], full: bool, which: list[int],
                    low: int | None) -> dict[str, torch.Tensor]:
    """One shard of this extraction's own layout gathered from a source that kept every example's states
    (``index``: :func:`source_index`): the ``examples`` in order, every token field as captured, and the states of
    the asked pairs (``which``: their indices among the source's, renumbered 0..) — every pair's base and teacher
    states in a ``full`` shard, in a light one the base's state at pair ``low`` alone (None: none)."""
    from safetensors import safe_open

    cols: dict[str, list[torch.Tensor]] = {}
    for path in dict.fromkeys(index[i][0] for i in examples):  # each source shard opened once, the order kept
        with safe_open(path, "pt") as f:
            names = {k: v for k, v in _kept_keys(path, set(f.keys()), which, full, low).items() if k != "offsets"}
            for pos, i in enumerate(examples):
                if index[i][0] != path:
                    continue
                _, a, b = index[i]
                for k, name in names.items():
                    cols.setdefault(name, [None] * len(examples))[pos] = f.get_slice(k)[a:b]
    tensors = {k: torch.cat(v) for k, v in cols.items()}
    tensors["offsets"] = torch.tensor([0] + [index[i][2] - index[i][1] for i in examples]).cumsum(0)
    return tensors

