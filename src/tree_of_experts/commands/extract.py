"""`toe extract`: paired hidden states -> projector (ridge, then trained) -> tree + bank -> an untrained plug-in.

Output folder layout::

    run.json                 settings of this extraction (a rerun with other settings is refused)
    shards/shard-00000.safetensors ...   fp16 teacher/base states per token, ids, masks, teacher top-k log-probs
                             (under --max_disk / --state_tokens the states of a sample of the examples only: light
                             shards hold the others' ids, masks, top-k and low states; extraction/budget.py)
    manifest.json            models, revisions, layers, data hash, counts, timings, shard list
    projector.safetensors    ridge map and trained fusion map per layer
    route_data.safetensors   sampled base states, their leaf ids and path branches (Stage A supervision)
    toe_config.json, toe_model.safetensors, README.md   the plug-in (gate initialised from the geometry, s = 0)
    summary.json, summary.md projector fit, O1 dev CE table, cluster sizes, effective leaves, throughput
    build.json               the settings the tree and bank were built with: a rerun with them returns the finished
                             extraction without loading a model; a rerun with others is refused (`toe rebuild`)

`toe rebuild --source EXTRACTION --out NEW --num_leaves N --shape deep` redoes only the tree and bank from an
extraction's shards and trained fusion map (sweeps over N and shape without running the teacher again).
`toe extract --layers 11 --reuse_capture EXTRACTION ...` takes a subset of an extraction's layers from its shards
instead of running the models again (layer-set sweeps: the fusion maps, trained jointly over the layer set, and the
tree are built anew; the result is the extraction a fresh capture of those layers gives).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import os
import time

import torch
from tqdm.auto import tqdm

from ..config import ToEError
from ..data import file_hash, read_jsonl
from ..extraction.budget import Asked, Plan, check_leaves_fit, config_sizes, plan_extraction, shard_groups
from ..extraction.build import Pairing, build, build_tree, clustered_rows
from ..extraction.capture import capture_shard, default_layer, prepare, same_vocab, teacher_layer_for
from ..extraction.fusion import (
    FusionMap,
)
from ..extraction.store import CORRUPT, CORRUPT_SHARD, Extraction
from ..hf.loading import arch_fingerprint, decoder_layer_count, load_causal_lm, load_config, load_tokenizer
from ..hf.layers import decoder_layers
from ..files import atomic_save_tensors, atomic_write_json, load_tensors, read_json
from ..folders import check_extraction, claim_out
from ..locks import releases_out_locks
from ..options import TRAINING_ONLY, Capture, Disk, Fusion, Runtime, Text, Tree, grouped, refuse_unused

log = logging.getLogger(__name__)

BUILD_NAME = "build.json"


def finished_extraction(out: str, build_settings: dict) -> dict | None:
    """The summary of the finished extraction in ``out`` when it was built with ``build_settings`` (its capture
    settings are checked by :func:`check_same_extraction`); None when it is unfinished or predates build.json (then
    the rerun builds it again). Refuses a finished one built with other settings, naming them and the fix."""
    summary_path, build_path = os.path.join(out, "summary.json"), os.path.join(out, BUILD_NAME)
    if not (os.path.isfile(summary_path) and os.path.isfile(build_path)):
        return None
    previous = read_json(build_path, "delete the folder (or pass --overwrite true) and extract again")
    changed = sorted(k for k in set(previous) | set(build_settings) if previous.get(k) != build_settings.get(k))
    if changed:
        how = (f"`toe rebuild --source {out} --out NEW` builds a tree with these from its shards and fusion maps"
               if set(changed) <= REBUILT else
               f"`toe extract ... --reuse_capture {out} --out NEW` builds one with these from its shards")
        raise ToEError(f"{out} holds a finished extraction built with other settings ({', '.join(changed)}): {how}, "
                       "without running the models; --overwrite true extracts again")
    return read_json(summary_path, "delete the folder (or pass --overwrite true) and extract again")


def whole(out: str) -> list[str]:
    """What a finished extraction in ``out`` lacks or holds damaged: missing files and shards whose size or sha256
    differs from the manifest's record (every shard is read once)."""
    ex = Extraction(out)
    try:
        return ex.missing_pieces() + ex.damaged_shards(full=True)
    except ToEError:  # a damaged manifest: everything is built again (the shards checked by their headers)
        return ["manifest.json"]


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


def check_same_extraction(out: str, settings: dict) -> None:
    """Refuses to continue the extraction in ``out`` with other ``settings`` (those given), naming them."""
    run_path = os.path.join(out, "run.json")
    if not os.path.isfile(run_path):
        return
    previous = read_json(run_path, "delete the folder (or pass --overwrite true) and extract again")
    changed = sorted(k for k in settings if previous.get(k) != settings[k])
    if changed:
        raise ToEError(f"{out} holds an extraction with other settings ({', '.join(changed)}): pass --overwrite true to "
                       "replace it, or a new --out")


def check_layers(layers, teacher_layers, n_base: int | None, n_teacher: int | None) -> None:
    """Refuses injection layers that repeat or fall outside the base, teacher layers outside the teacher, and
    teacher layers that do not pair one to one with the injection layers (a count of None is not checked)."""
    if layers and len(set(layers)) != len(layers):
        raise ToEError(f"layers={list(layers)}: each injection layer once (give distinct decoder layer indices)")
    if layers and teacher_layers and len(teacher_layers) != len(layers):
        raise ToEError(f"teacher_layers={list(teacher_layers)} needs one entry per injection layer in "
                       f"layers={list(layers)}")
    for name, ls, n in (("layers", layers, n_base), ("teacher_layers", teacher_layers, n_teacher)):
        if ls and any(x < 0 for x in ls):
            raise ToEError(f"{name}={list(ls)}: decoder layer indices count from 0")
        if ls and n is not None and any(x >= n for x in ls):
            raise ToEError(f"{name}={list(ls)} out of range: that model has {n} decoder layers (0..{n - 1})")


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


def resolve_layers(layers, teacher_layers, n_b: int | None, n_t: int | None) -> tuple[list[int], list[int]]:
    """The injection layers (default: the base's middle layer) and the teacher layer read for each (default: the
    same relative depth)."""
    layers = list(layers) if layers else [default_layer(n_b)]
    return layers, list(teacher_layers) if teacher_layers else [teacher_layer_for(ell, n_b, n_t) for ell in layers]


def reused_pairs(path: str, source: dict, layers: list[int], teacher_layers: list[int]) -> list[int]:
    """Where each asked (layer, teacher layer) pair sits among the ones the source at PATH captured."""
    captured = list(zip(source["layers"], source["teacher_layers"]))
    asked = list(zip(layers, teacher_layers))
    missing = [p for p in asked if p not in captured]
    if missing:
        raise ToEError(f"--reuse_capture {path} holds the (layer, teacher layer) pairs {captured}, not {missing}: ask "
                       "for layers among those, or extract without --reuse_capture")
    return [captured.index(p) for p in asked]


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


def disk_plan(examples, teacher: str, base: str, capture: Capture, fusion: Fusion, tree: Tree, disk: Disk,
              dtype: str, kd: bool, batch_size: int, seed: int, layers: int, sample: list[int] | None) -> Plan:
    """The extraction's plan (extraction/budget.py) from the models' configs alone: no weights load. ``layers``:
    how many injection layers; ``sample``: a sample fixed beforehand (the source's, under --reuse_capture)."""
    t_kw, b_kw = capture.model_kwargs()
    same_model = teacher == base and t_kw == b_kw
    sizes = config_sizes(load_config(base, **b_kw), load_config(teacher, "teacher", **t_kw), dtype, same_model)
    return plan_extraction(examples, sizes, Asked(
        layers=layers, topk=capture.topk_logprobs, kd=kd, cache_low_states=disk.cache_low_states,
        heldout_frac=fusion.heldout_frac, shard_size=capture.shard_size, batch_size=batch_size,
        num_leaves=tree.num_leaves, shape=tree.shape, gate_rank=tree.gate_rank, max_rows=tree.max_rows,
        max_disk=disk.budget(), state_tokens=disk.state_tokens, seed=seed, sample=sample))


def build_record(text: Text, tree: Tree, fusion: Fusion, capture: Capture, dtype: str, seed: int) -> dict:
    """The settings a finished extraction's tree and bank were built with (build.json), flat and as JSON reads them
    back: a rerun with the same ones returns the extraction as it is."""
    return json.loads(json.dumps({
        **tree.to_dict(), "limit": text.limit, "heldout_frac": fusion.heldout_frac, "max_length": text.max_length,
        "shard_size": capture.shard_size, "projector_epochs": fusion.projector_epochs,
        "projector_lr": fusion.projector_lr, "dtype": dtype, "ridge_lambdas": [float(x) for x in fusion.ridge_lambdas],
        "seed": seed}))


REBUILT = {f.name for f in dataclasses.fields(Tree)} | {"dtype", "seed"}  # the build settings `toe rebuild` changes


@grouped
@releases_out_locks
def extract(
    teacher: str,
    base: str,
    data: str,
    out: str,
    text: Text = Text(),
    tree: Tree = Tree(),
    capture: Capture = Capture(),
    fusion: Fusion = Fusion(),
    disk: Disk = Disk(),
    runtime: Runtime = Runtime(),
    batch_size: int = 8,
    seed: int = 0,
) -> dict | None:
    """Builds an expert bank and tree from a teacher, a base and reasoning text.

    Every option of a group can also be given flat (``extract(..., num_leaves=8, layers=[5])``; on the command line
    ``--num_leaves 8`` or ``--tree.num_leaves 8``).

    Args:
        teacher: hub id or local folder of the teacher.
        base: hub id or local folder of the base.
        data: the reasoning examples, one per row: a .jsonl/.json/.csv/.parquet file or hf:NAME[:CONFIG]:SPLIT
            (GSM8K's question/answer by default).
        out: output folder; rerunning with the same settings resumes from the last complete shard.
        text: which rows are read and how each becomes text (one prompt text for both models, in the base's format;
            ``skip_truncated`` is refused: an extraction keeps every row, its response cut at ``max_length``).
        tree: the tree and bank built from the expert signal, and the plug-in's routing.
        capture: which layers are paired, from which model files (or an earlier extraction's shards), what each
            shard holds.
        fusion: the ridge and trained fusion maps fitted on the capture, and the held-out examples that score them.
        disk: a bound on the folder's size (a sample of the examples keeps its states; docs/scale.md), and the plan
            alone (``dry_run``).
        runtime: dtype both models run in, device (default: the accelerate process's), overwrite (replace what
            another run, or an extraction with other settings, left in ``out``); a rerun resumes on its own, so
            ``resume`` is refused, as are the training-only fields.
        batch_size: sequences per forward of the capture.
        seed: seed for the sample of examples that keep their states, the clustering and the projector's data order.

    Returns:
        The summary dict (on the main process; None on the others under ``accelerate launch``); with ``dry_run``
        the plan (``{"plan": ..., "summary": its text}``).
    """
    from accelerate import PartialState

    refuse_unused("toe extract", text, [f.name for f in dataclasses.fields(Text) if f.name != "skip_truncated"],
                  "an extraction keeps every row, its response cut at max_length")
    refuse_unused("toe extract", runtime, ("dtype", "device", "overwrite"),
                  {**TRAINING_ONLY, "resume": "a rerun with the same settings resumes from its last complete shard on "
                                              "its own"})
    layers, teacher_layers, reuse_capture = capture.layers, capture.teacher_layers, capture.reuse_capture
    dtype, dry_run = runtime.dtype, disk.dry_run
    budget = disk.budget()
    if reuse_capture and disk.sampled():
        raise ToEError("--reuse_capture takes its states, and its sample of examples with states, from the source's "
                       "shards: drop --max_disk/--state_tokens")
    state = PartialState(cpu=not torch.cuda.is_available())  # cpu=True: gloo process group under torchrun
    if state.is_main_process and not dry_run:
        claim_out(out, "extract", overwrite=runtime.overwrite,
                  inputs={"teacher": teacher, "base": base, "reuse_capture": reuse_capture, "data": data})
    state.wait_for_everyone()
    dev = torch.device(runtime.device) if runtime.device else state.device
    spec = text.spec()
    records = read_jsonl(data, spec, text.limit)
    t_kw, b_kw = capture.model_kwargs()
    base_tok, teacher_tok = load_tokenizer(base, **b_kw), load_tokenizer(teacher, **t_kw)
    spec = spec.for_tokenizer(base_tok)  # one prompt text for both models, in the base's format
    kd = same_vocab(base_tok, teacher_tok) and capture.topk_logprobs > 0
    early = {"teacher": teacher, "base": base, "data_sha256": file_hash(data), "limit": text.limit,
             "spec": dataclasses.asdict(spec), "max_length": text.max_length, "shard_size": capture.shard_size,
             "topk_logprobs": capture.topk_logprobs if kd else 0, "dtype": dtype,
             **({"layers": list(layers)} if layers else {}),
             **({"teacher_layers": list(teacher_layers)} if teacher_layers else {}),
             # the sample's settings (None: every example keeps its states, as before budgets existed)
             "state_budget": None if not disk.sampled() else {
                 "max_disk": budget, "state_tokens": disk.state_tokens, "seed": seed,
                 "heldout_frac": fusion.heldout_frac, "cache_low_states": disk.cache_low_states}}
    if not dry_run:
        check_same_extraction(out, early)  # what can be compared before the models load
    # the layer lists against the configs' layer counts, before any weights load (again after, where a config
    # does not say)
    n_b_config, n_t_config = decoder_layer_count(base, **b_kw), decoder_layer_count(teacher, **t_kw)
    check_layers(layers, teacher_layers, n_b_config, n_t_config)
    damaged: list[str] = []  # what a finished extraction lacks or holds damaged (then captured and built again)
    known = bool(layers or n_b_config is not None) and bool(teacher_layers or None not in (n_b_config, n_t_config))
    build_settings = build_record(text, tree, fusion, capture, dtype, seed)  # the capture's are run.json's
    # a finished extraction with these settings (its default layers resolved) is returned as it is
    if known and not dry_run:
        check_same_extraction(out, dict(zip(("layers", "teacher_layers"),
                                            resolve_layers(layers, teacher_layers, n_b_config, n_t_config))))
        finished = finished_extraction(out, build_settings)
        damaged = whole(out) if finished is not None else []
        if finished is not None and not damaged:  # nothing to capture or build: no model is loaded
            log.info("%s: a finished extraction with these settings, its shards checked against the manifest's "
                     "hashes; reused as it is (--overwrite true extracts again)", out)
            return finished if state.is_main_process else None
        if damaged:  # the damaged shards are captured again below, and the rest rebuilt from them
            log.warning("%s: a finished extraction with these settings lacks or has damaged %s: capturing and "
                        "building them again", out, ", ".join(damaged[:6]) + (", ..." if len(damaged) > 6 else ""))
    source = reusable_capture(reuse_capture, early) if reuse_capture else None  # (a finished one needs it no more)
    if source is not None:  # the pairs asked for against the source's, before any weights load
        if not known:
            raise ToEError("the models' configs do not give their layer counts: pass --layers and --teacher_layers "
                           "with --reuse_capture")
        reused_pairs(reuse_capture, source, *resolve_layers(layers, teacher_layers, n_b_config, n_t_config))
    examples = prepare(records, spec, base_tok, teacher_tok, text.max_length)
    plan = None
    if early["state_budget"] is not None or dry_run or (source or {}).get("state_examples") is not None:
        if not known:
            raise ToEError("the models' configs do not give their layer counts: pass --layers and --teacher_layers "
                           "to plan the disk (--max_disk, --state_tokens, --dry_run)")
        plan = disk_plan(examples, teacher, base, capture, fusion, tree, disk, dtype, kd, batch_size, seed,
                         len(resolve_layers(layers, teacher_layers, n_b_config, n_t_config)[0]),
                         (source or {}).get("state_examples"))
        log.info("extraction plan:\n%s", plan.text())
        if dry_run:
            return {"plan": plan.to_dict(), "summary": plan.text()}
    sample = plan.state_examples if plan is not None else None
    check_leaves_fit(tree.num_leaves, tree.shape,
                     clustered_rows(examples, fusion.heldout_frac, tree.sample_rate, tree.max_rows, sample))
    base_model = load_causal_lm(base, dtype=dtype, device=str(dev), **b_kw)
    # the same model read twice (the no-teacher control): loaded once, and one forward serves both without top-k
    same_model = teacher == base and t_kw == b_kw
    if source is not None:  # the states come from the source's shards: the teacher is never loaded
        teacher_model = None
    else:
        teacher_model = base_model if same_model else load_causal_lm(teacher, dtype=dtype, device=str(dev), **t_kw)
    n_b = len(decoder_layers(base_model))
    n_t = n_t_config if teacher_model is None else len(decoder_layers(teacher_model))
    layers, teacher_layers = resolve_layers(layers, teacher_layers, n_b, n_t)
    check_layers(layers, teacher_layers, n_b, n_t)
    which = reused_pairs(reuse_capture, source, layers, teacher_layers) if source is not None else None
    settings = {
        "teacher": teacher, "base": base, "data_sha256": file_hash(data), "limit": text.limit,
        "spec": dataclasses.asdict(spec), "layers": layers, "teacher_layers": teacher_layers,
        "max_length": text.max_length, "shard_size": capture.shard_size,
        "topk_logprobs": capture.topk_logprobs if kd else 0, "dtype": dtype,
        "teacher_arch": source["teacher_arch"] if source else arch_fingerprint(teacher_model.config)[1],
        "base_arch": arch_fingerprint(base_model.config)[1],
        "state_budget": early["state_budget"], "state_examples": sample,
    }
    if source is not None and source.get("base_arch") != settings["base_arch"]:
        raise ToEError(f"--reuse_capture {reuse_capture} was captured from a base of another architecture: give an "
                       "extraction of this base, or extract without --reuse_capture")
    os.makedirs(os.path.join(out, "shards"), exist_ok=True)
    run_path = os.path.join(out, "run.json")
    if state.is_main_process:
        if os.path.isfile(run_path):
            check_same_extraction(out, settings)
        else:
            atomic_write_json(run_path, settings)
        for rel in damaged_shards(out, damaged):  # a shard damaged since it was written is captured again
            log.warning("%s: %s is missing or damaged: capturing it again", out, rel)
            if os.path.lexists(os.path.join(out, rel)):
                os.remove(os.path.join(out, rel))
    state.wait_for_everyone()

    # 1. Capture: shard s goes to process s % world; finished shards are skipped on resume. Under a sample, the
    # sampled examples' full shards come first, then light ones (extraction/budget.py).
    groups = shard_groups(examples, sample, capture.shard_size)
    low = min(range(len(layers)), key=lambda j: layers[j]) if disk.cache_low_states else None
    mine = [s for s in range(len(groups)) if s % state.num_processes == state.process_index]
    timings = {"teacher_s": 0.0, "base_s": 0.0, "tokens": 0, "wall_s": 0.0}
    pad = base_tok.pad_token_id
    t_start = time.perf_counter()
    for s in tqdm(mine, desc="extract shards", disable=None if state.is_local_main_process else True):
        path = os.path.join(out, "shards", f"shard-{s:05d}.safetensors")
        if os.path.exists(path):
            continue
        if which is not None:
            tensors = layer_subset(reuse_capture, os.path.basename(path), which, layers)
        else:
            chunk, full = groups[s]
            tensors = capture_shard(chunk, teacher_model, base_model, layers, teacher_layers, batch_size,
                                    capture.topk_logprobs, pad, kd, timings, full=full, low=low)
        atomic_save_tensors(path, tensors)
    timings["wall_s"] = time.perf_counter() - t_start
    if reuse_capture:
        timings["reused_capture"] = os.path.abspath(reuse_capture)
    atomic_write_json(os.path.join(out, f"timings-{state.process_index}.json"), timings)
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    del teacher_model
    gc.collect()  # the teacher's memory back before the fusion map trains (it can be most of the RSS)
    build_path = os.path.join(out, BUILD_NAME)
    if os.path.exists(build_path):  # a build interrupted half way is not a finished one
        os.remove(build_path)
    summary = build(out, base_model, base_tok, tree, fusion, Pairing(layers, teacher_layers, teacher, kd, settings),
                    examples, seed, dev, plan.to_dict() if plan is not None else None)
    if known:  # last: it marks the folder finished (a rerun whose layers cannot be resolved early builds again)
        atomic_write_json(build_path, build_settings)
    return summary


@grouped
@releases_out_locks
def rebuild(
    source: str,
    out: str,
    tree: Tree = Tree(),
    runtime: Runtime = Runtime(),
    seed: int = 0,
) -> dict:
    """Builds a new tree and bank from an extraction, without running the teacher again.

    Reuses ``source``'s captured shards (linked, not copied), ridge map, trained fusion map and O1 table; only the
    clustering and the gate's initialisation are redone. This is how sweeps over N, ToE-B vs ToE-D or K cost
    minutes instead of a new capture. Every option of a group can also be given flat (``rebuild(source, out,
    num_leaves=8)``; on the command line ``--num_leaves 8`` or ``--tree.num_leaves 8``).

    Args:
        source: a finished `toe extract` folder.
        out: the new extraction folder (usable wherever an extraction is: `toe train --experts OUT`).
        tree: the new tree and bank (``sample_rate`` of the source's training tokens; ``signal="fusion_map"``
            reads the source's trained map, ``"ridge"`` its ridge map).
        runtime: dtype of the base while building, overwrite (replace what another run left in ``out``); the
            tree is built on the CPU (``device`` is refused), as are ``resume`` and the training-only fields.
        seed: seed for sampling and clustering.
    """
    refuse_unused("toe rebuild", runtime, ("dtype", "overwrite"),
                  {**TRAINING_ONLY, "device": "the tree is clustered on the CPU",
                   "resume": "a rebuild is minutes: rerun it with --overwrite true"})
    dtype = runtime.dtype
    needed = ("run.json", "manifest.json", "summary.json", "projector.safetensors")
    missing = [f for f in needed if not os.path.isfile(os.path.join(source, f))]
    if missing:
        raise ToEError(f"{source} is not a finished `toe extract` folder (missing {', '.join(missing)}): run "
                       "`toe extract` to the end first")
    if os.path.abspath(source) == os.path.abspath(out):
        raise ToEError("rebuild --out must be a new folder, not the source extraction")
    check_extraction(source, "source")
    settings = read_json(os.path.join(source, "run.json"), CORRUPT)
    manifest = read_json(os.path.join(source, "manifest.json"), CORRUPT)
    prior = read_json(os.path.join(source, "summary.json"), CORRUPT)
    counts = manifest["counts"]
    train_share = 1 - len(counts["heldout"]) / max(counts["examples"], 1)
    with_states = counts.get("state_tokens", prior["tokens"])  # the tokens the tree is built from (the sample's)
    check_leaves_fit(tree.num_leaves, tree.shape, min(tree.max_rows, int(with_states * train_share * tree.sample_rate)))
    claim_out(out, "rebuild", overwrite=runtime.overwrite, inputs={"source": source})
    os.makedirs(out, exist_ok=True)
    link = os.path.join(out, "shards")
    if os.path.islink(link) and os.path.realpath(link) != os.path.realpath(os.path.join(source, "shards")):
        os.remove(link)
    if not os.path.exists(link):
        os.symlink(os.path.abspath(os.path.join(source, "shards")), link)
    atomic_write_json(os.path.join(out, "run.json"), settings)
    base_model = load_causal_lm(settings["base"], dtype=dtype)
    proj = load_tensors(os.path.join(source, "projector.safetensors"), CORRUPT)
    layers = prior["layers"]
    maps = torch.nn.ModuleList()
    for layer in layers:
        fm = FusionMap(proj[f"ridge.{layer}"])
        fm.load_state_dict({k.split(".", 2)[2]: v for k, v in proj.items() if k.startswith(f"trained.{layer}.")})
        maps.append(fm)
    atomic_save_tensors(os.path.join(out, "projector.safetensors"), proj)
    fit = {k: prior[k] for k in ("projector", "fusion_map_loss_first_last", "o1_heldout_ce")}
    counts = {"tokens": prior["tokens"], **manifest["counts"]}
    pairing = Pairing(layers, prior["teacher_layers"], prior["teacher"], prior["kd_cached"], settings)
    ridge = [proj[f"ridge.{layer}"] for layer in layers]
    return build_tree(out, source, base_model, tree, pairing, counts, maps, ridge, fit, {}, seed)


