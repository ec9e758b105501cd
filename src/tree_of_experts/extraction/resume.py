"""What a rerun of `toe extract` finds in its own folder, and what it records there for the next one.

    run.json     the capture's settings (:func:`capture_record` before the models load, :func:`run_record` after):
                 a rerun with other ones is refused (:func:`check_same_extraction`), one with the same ones resumes
                 from the last complete shard
    timings-P.json  process P's capture times so far (written after every shard; a resumed capture adds to them,
                 :func:`timings_so_far`)
    build.json   the settings the tree and bank were built with (:func:`build_record`), written last: it marks the
                 folder finished, and a rerun with the same ones returns the extraction without loading a model
                 (:func:`finished_or_damaged`) unless a piece is missing or a shard's sha256 differs from the
                 manifest's (then those shards are captured again and the rest rebuilt from them)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os

from ..data import DataSpec, file_hash
from ..errors import ToEError
from ..files import atomic_write_json, read_json
from ..options import Capture, Disk, Fusion, Text, Tree
from .store import Extraction

log = logging.getLogger(__name__)

BUILD_NAME = "build.json"
REBUILT = {f.name for f in dataclasses.fields(Tree)} | {"dtype", "seed"}  # the build settings `toe rebuild` changes
REDO = "delete the folder (or pass --overwrite true) and extract again"


def capture_record(teacher: str, base: str, data: str, spec: DataSpec, text: Text, capture: Capture, disk: Disk,
                   fusion: Fusion, dtype: str, kd: bool, seed: int) -> dict:
    """The capture's settings known before the models load (the layers only where given), checked against run.json;
    ``spec`` is the prompt spec in the base's format, ``kd`` whether the teacher's top-k is cached."""
    return {"teacher": teacher, "base": base, "data_sha256": file_hash(data), "limit": text.limit,
            "spec": dataclasses.asdict(spec), "max_length": text.max_length, "shard_size": capture.shard_size,
            "topk_logprobs": capture.topk_logprobs if kd else 0, "dtype": dtype,
            **({"layers": list(capture.layers)} if capture.layers else {}),
            **({"teacher_layers": list(capture.teacher_layers)} if capture.teacher_layers else {}),
            # the sample's settings (None: every example keeps its states, as before budgets existed)
            "state_budget": None if not disk.sampled() else {
                "max_disk": disk.budget(), "state_tokens": disk.state_tokens, "seed": seed,
                "heldout_frac": fusion.heldout_frac, "cache_low_states": disk.cache_low_states}}


def run_record(early: dict, layers: list[int], teacher_layers: list[int], teacher_arch: str, base_arch: str,
               sample: list[int] | None) -> dict:
    """run.json: the capture's settings ``early`` (:func:`capture_record`) with the layers resolved, both models'
    architecture fingerprints and the examples that keep their states (``sample``; None: every example)."""
    return {
        "teacher": early["teacher"], "base": early["base"], "data_sha256": early["data_sha256"],
        "limit": early["limit"], "spec": early["spec"], "layers": layers, "teacher_layers": teacher_layers,
        "max_length": early["max_length"], "shard_size": early["shard_size"],
        "topk_logprobs": early["topk_logprobs"], "dtype": early["dtype"],
        "teacher_arch": teacher_arch, "base_arch": base_arch,
        "state_budget": early["state_budget"], "state_examples": sample,
    }


def build_record(text: Text, tree: Tree, fusion: Fusion, capture: Capture, dtype: str, seed: int) -> dict:
    """The settings a finished extraction's tree and bank were built with (build.json), flat and as JSON reads them
    back: a rerun with the same ones returns the extraction as it is."""
    return json.loads(json.dumps({
        **tree.to_dict(), "limit": text.limit, "heldout_frac": fusion.heldout_frac, "max_length": text.max_length,
        "shard_size": capture.shard_size, "projector_epochs": fusion.projector_epochs,
        "projector_lr": fusion.projector_lr, "dtype": dtype, "ridge_lambdas": [float(x) for x in fusion.ridge_lambdas],
        "seed": seed}))


def check_same_extraction(out: str, settings: dict) -> None:
    """Refuses to continue the extraction in ``out`` with other ``settings`` (those given), naming them."""
    run_path = os.path.join(out, "run.json")
    if not os.path.isfile(run_path):
        return
    previous = read_json(run_path, REDO)
    changed = sorted(k for k in settings if previous.get(k) != settings[k])
    if changed:
        raise ToEError(f"{out} holds an extraction with other settings ({', '.join(changed)}): pass --overwrite true "
                       "to replace it, or a new --out")


def finished_extraction(out: str, build_settings: dict) -> dict | None:
    """The summary of the finished extraction in ``out`` when it was built with ``build_settings`` (its capture
    settings are checked by :func:`check_same_extraction`); None when it is unfinished or predates build.json (then
    the rerun builds it again). Refuses a finished one built with other settings, naming them and the fix."""
    summary_path, build_path = os.path.join(out, "summary.json"), os.path.join(out, BUILD_NAME)
    if not (os.path.isfile(summary_path) and os.path.isfile(build_path)):
        return None
    previous = read_json(build_path, REDO)
    changed = sorted(k for k in set(previous) | set(build_settings) if previous.get(k) != build_settings.get(k))
    if changed:
        how = (f"`toe rebuild --source {out} --out NEW` builds a tree with these from its shards and fusion maps"
               if set(changed) <= REBUILT else
               f"`toe extract ... --reuse_capture {out} --out NEW` builds one with these from its shards")
        raise ToEError(f"{out} holds a finished extraction built with other settings ({', '.join(changed)}): {how}, "
                       "without running the models; --overwrite true extracts again")
    return read_json(summary_path, REDO)


def whole(out: str) -> list[str]:
    """What a finished extraction in ``out`` lacks or holds damaged: missing files and shards whose size or sha256
    differs from the manifest's record (every shard is read once)."""
    ex = Extraction(out)
    try:
        return ex.missing_pieces() + ex.damaged_shards(full=True)
    except ToEError:  # a damaged manifest: everything is built again (the shards checked by their headers)
        return ["manifest.json"]


def finished_or_damaged(out: str, layer_pairs: tuple[list[int], list[int]],
                        build_settings: dict) -> tuple[dict | None, list[str]]:
    """A rerun's look at ``out`` once its layers are known (``layer_pairs``: the injection layers and the teacher
    layer for each): refuses other layers (:func:`check_same_extraction`) and other build settings, then gives the
    finished extraction's summary when it is whole (nothing to capture or build: no model need load), else None and
    what a finished one lacks or holds damaged (captured and built again; [] for an unfinished one)."""
    check_same_extraction(out, dict(zip(("layers", "teacher_layers"), layer_pairs)))
    finished = finished_extraction(out, build_settings)
    damaged = whole(out) if finished is not None else []
    if finished is not None and not damaged:
        log.info("%s: a finished extraction with these settings, its shards checked against the manifest's "
                 "hashes; reused as it is (--overwrite true extracts again)", out)
        return finished, []
    if damaged:  # the damaged shards are captured again, and the rest rebuilt from them
        log.warning("%s: a finished extraction with these settings lacks or has damaged %s: capturing and "
                    "building them again", out, ", ".join(damaged[:6]) + (", ..." if len(damaged) > 6 else ""))
    return None, damaged


def damaged_shards(out: str, found: list[str]) -> list[str]:
    """The shards to capture again: those ``found`` damaged (by their sha256) and those missing, cut short or not
    as long as the manifest recorded (a damaged manifest: checked by their headers alone)."""
    ex = Extraction(out)
    try:
        bad = ex.damaged_shards()
    except ToEError:
        os.remove(ex.path("manifest.json"))  # rewritten by the build
        bad = ex.damaged_shards()
    return sorted(set(bad) | {rel for rel in found if rel.startswith("shards" + os.sep)})


def record_run(out: str, settings: dict, damaged: list[str]) -> None:
    """Writes run.json (``settings``), or refuses a run.json with others; removes the shards to capture again
    (``damaged``: what :func:`finished_or_damaged` found, and any shard damaged since it was written)."""
    run_path = os.path.join(out, "run.json")
    if os.path.isfile(run_path):
        check_same_extraction(out, settings)
    else:
        atomic_write_json(run_path, settings)
    for rel in damaged_shards(out, damaged):
        log.warning("%s: %s is missing or damaged: capturing it again", out, rel)
        if os.path.lexists(os.path.join(out, rel)):
            os.remove(os.path.join(out, rel))


def unmark_finished(out: str) -> None:
    """Removes build.json before a build: a build interrupted half way is not a finished one."""
    build_path = os.path.join(out, BUILD_NAME)
    if os.path.exists(build_path):
        os.remove(build_path)


def mark_finished(out: str, build_settings: dict) -> None:
    """Writes build.json, last: it marks the folder finished with these build settings."""
    atomic_write_json(os.path.join(out, BUILD_NAME), build_settings)


TIMED = ("teacher_s", "base_s", "tokens", "wall_s")  # a capture's times, per shard and in total


def timings_so_far(record: str) -> dict:
    """The capture's timings recorded so far by earlier runs of this process index (a resumed capture adds its
    shards' times to them, :func:`add_shard_timings`), or none. A record from before per-shard times keeps its totals
    as one entry."""
    try:
        found = read_json(record, "") if os.path.exists(record) else {}
    except ToEError:  # timings only: a damaged record starts again from zero
        found = {}
    if not isinstance(found, dict) or not found:
        return {**dict.fromkeys(TIMED, 0), "per_shard": {}}
    if "per_shard" not in found:
        found["per_shard"] = {"earlier": {k: found.get(k, 0) for k in TIMED}}
    return found


def add_shard_timings(timings: dict, shard: int, times: dict, memory: dict) -> dict:
    """``timings`` with shard ``shard``'s ``times`` (teacher_s, base_s, tokens, wall_s; a shard captured again
    replaces its entry) and their totals, and the largest ``memory`` peaks (:func:`peak_memory`) of the runs so far."""
    out = {**timings, "per_shard": {**timings.get("per_shard", {}), str(shard): times}}
    for k in TIMED:
        out[k] = sum(t.get(k, 0) for t in out["per_shard"].values())
    out["shards"] = sum(k.isdigit() for k in out["per_shard"])
    for k, v in memory.items():  # each run sees its own process's peak: the record keeps the largest
        out[k] = max(out.get(k, 0.0), v)
    return out
