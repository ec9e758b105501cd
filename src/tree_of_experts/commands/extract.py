"""`toe extract`: paired hidden states -> projector (ridge, then trained) -> tree + bank -> an untrained plug-in.

Output folder layout::

    run.json                 settings of this extraction (a rerun with other settings is refused)
    shards/shard-00000.safetensors ...   fp16 teacher/base states per token, ids, masks, teacher top-k log-probs
                             (under --max_disk / --state_tokens the states of a sample of the examples only: light
                             shards hold the others' ids, masks, top-k and low states; extraction/budget.py)
    manifest.json            models, revisions, layers, data hash, counts, timings, shard list
    projector.safetensors    ridge map and trained fusion map per layer
    route_data.safetensors   sampled base states (under a disk budget, where they sit in the shards), their leaf ids
                             and path branches (Stage A supervision)
    toe_config.json, toe_model.safetensors, README.md   the plug-in (gate initialised from the geometry, s = 0)
    summary.json, summary.md projector fit, O1 dev CE table, cluster sizes, effective leaves, throughput
    build.json               the settings the tree and bank were built with: a rerun with them returns the finished
                             extraction without loading a model; a rerun with others is refused (`toe rebuild`)

`toe rebuild --source EXTRACTION --out NEW --num_leaves N --shape deep` redoes only the tree and bank from an
extraction's shards and trained fusion map (sweeps over N and shape without running the teacher again).
`toe extract --layers 11 --reuse_capture EXTRACTION ...` takes a subset of an extraction's layers from its shards
instead of running the models again (layer-set sweeps: the fusion maps, trained jointly over the layer set, and the
tree are built anew; the result is the extraction a fresh capture of those layers gives).

What a rerun checks and records in its folder is :mod:`..extraction.resume`'s; what ``--reuse_capture`` takes from the
source, :mod:`..extraction.reuse`'s; the plan of a disk budget, :mod:`..extraction.budget`'s.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
import time

import torch
from tqdm.auto import tqdm

from ..config import ToEError
from ..data import read_jsonl
from ..extraction.budget import Plan, check_leaves_fit, disk_plan, shard_groups
from ..extraction.build import Pairing, build, build_tree, clustered_rows
from ..extraction.capture import capture_shard, check_layers, prepare, resolve_layers, same_vocab
from ..extraction.fusion import FusionMap
from ..extraction.resume import (
    add_shard_timings,
    build_record,
    capture_record,
    check_same_extraction,
    finished_or_damaged,
    mark_finished,
    record_run,
    run_record,
    timings_so_far,
    unmark_finished,
)
from ..extraction.reuse import (check_same_base, layer_subset, resampled_shard, reused_pairs, reused_source,
                                source_index)
from ..extraction.store import CORRUPT, Extraction
from ..hf.loading import (arch_fingerprint, check_one_process, decoder_layer_count, load_causal_lm, load_config,
                          load_tokenizer)
from ..hf.layers import decoder_layers
from ..files import atomic_save_tensors, atomic_write_json, load_tensors, read_json
from ..folders import check_extraction, claim_out
from ..locks import releases_out_locks
from ..options import TRAINING_ONLY, Capture, Disk, Fusion, Runtime, Text, Tree, grouped, refuse_unused
from ..training.checkpoint import peak_memory

log = logging.getLogger(__name__)


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

    _refuse_options(text, runtime, capture, disk)
    dtype, dry_run, reuse_capture = runtime.dtype, disk.dry_run, capture.reuse_capture
    state = PartialState(cpu=not torch.cuda.is_available())  # cpu=True: gloo process group under torchrun
    check_one_process(runtime.teacher_device_map, state.num_processes)  # (before the folder is claimed)
    if state.is_main_process and not dry_run:
        claim_out(out, "extract", overwrite=runtime.overwrite, inputs={"teacher": teacher, "base": base,
                                                                       "reuse_capture": reuse_capture, "data": data})
    state.wait_for_everyone()
    dev = torch.device(runtime.device) if runtime.device else state.device

    # Checks before any weights load: the settings against what `out` holds, the layers against the configs.
    spec, records, base_tok, teacher_tok = _read_text(data, text, capture, base, teacher)
    kd = same_vocab(base_tok, teacher_tok) and capture.topk_logprobs > 0
    early = capture_record(teacher, base, data, spec, text, capture, disk, fusion, dtype, kd, seed)
    if not dry_run:
        check_same_extraction(out, early)  # what can be compared before the models load
    asked, n_t_config = _config_layers(capture, base, teacher)  # asked: None where the configs cannot resolve them
    build_settings = build_record(text, tree, fusion, capture, dtype, seed)  # the capture's are run.json's
    damaged: list[str] = []  # what a finished extraction lacks or holds damaged (then captured and built again)
    if asked is not None and not dry_run:  # a finished extraction with these settings is returned as it is
        finished, damaged = finished_or_damaged(out, asked, build_settings)
        if finished is not None:  # nothing to capture or build: no model is loaded
            return finished if state.is_main_process else None
    source = reused_source(reuse_capture, early, asked, disk.sampled())  # (a finished one needs it no more)
    examples = prepare(records, spec, base_tok, teacher_tok, text.max_length)
    plan = _plan(examples, teacher, base, capture, fusion, tree, disk, dtype, kd, batch_size, seed, asked, source,
                 None if dry_run else out)
    if dry_run:
        return {"plan": plan.to_dict(), "summary": plan.text()}
    sample = plan.state_examples if plan is not None else None
    check_leaves_fit(tree.num_leaves, tree.shape,
                     clustered_rows(examples, fusion.heldout_frac, tree.sample_rate, tree.max_rows, sample))

    # Setup: the models, the layers they resolve, run.json (written once every check has passed). Every shard
    # already captured (a build to redo): the teacher is not loaded.
    groups = shard_groups(examples, sample, capture.shard_size)
    captured = asked is not None and not damaged and all(os.path.exists(_shard(out, s)) for s in range(len(groups))) \
        and not _cut_shards(out)  # a shard cut or grown since (record_run removes it): the teacher captures it again
    base_model, teacher_model = _load_models(base, teacher, dtype, dev, capture, runtime.teacher_map(), captured)
    pairing, which = _pairing(early, capture, source, teacher, kd, base_model, teacher_model, n_t_config, sample)
    os.makedirs(os.path.join(out, "shards"), exist_ok=True)
    if state.is_main_process:
        record_run(out, pairing.settings, damaged)  # and a shard damaged since it was written is captured again
    state.wait_for_everyone()

    # 1. Capture, every process its share of the shards; then the build on the main process alone.
    # a budget over a source that kept every example's states: the shards are gathered from it example by example
    index = source_index(reuse_capture, [e.index for e in examples]) if source is not None and not captured and \
        sample is not None and source.get("state_examples") is None else None
    _capture_shards(out, state, groups, base_model, teacher_model,
                    pairing, capture, batch_size, base_tok.pad_token_id, disk.cache_low_states, which, index)
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    del teacher_model
    gc.collect()  # the teacher's memory back before the fusion map trains (it can be most of the RSS)

    # 2-4. Fusion maps, tree and bank from the shards alone (extraction/build.py).
    unmark_finished(out)  # a build interrupted half way is not a finished one
    summary = build(out, base_model, base_tok, tree, fusion, pairing, examples, seed, dev,
                    plan.to_dict() if plan is not None else None)
    if asked is not None:  # last: it marks the folder finished (unresolved early, a rerun builds again)
        mark_finished(out, build_settings)
    return summary


def _refuse_options(text: Text, runtime: Runtime, capture: Capture, disk: Disk) -> None:
    """Refuses the options `toe extract` does not read, and --teacher_device_map with --reuse_capture."""
    refuse_unused("toe extract", text, [f.name for f in dataclasses.fields(Text) if f.name != "skip_truncated"],
                  "an extraction keeps every row, its response cut at max_length")
    refuse_unused("toe extract", runtime, ("dtype", "device", "overwrite", "teacher_device_map"),
                  {**TRAINING_ONLY, "resume": "a rerun with the same settings resumes from its last complete shard on "
                                              "its own"})
    if capture.reuse_capture and runtime.teacher_device_map:
        raise ToEError("--reuse_capture takes the teacher's states from the source's shards (no teacher loads): drop "
                       "--teacher_device_map")


def _cut_shards(out: str) -> bool:
    """Whether a shard of ``out`` differs in size from its manifest record or promised header (read-only; a damaged
    manifest counts: the shards are then checked by their headers, and may be captured again)."""
    try:
        return bool(Extraction(out).damaged_shards())
    except ToEError:
        return True


def _read_text(data: str, text: Text, capture: Capture, base: str, teacher: str):
    """The rows of ``data``, the prompt spec in the base's format (one prompt text for both models) and the base's
    and the teacher's tokenizers."""
    spec = text.spec()
    records = read_jsonl(data, spec, text.limit)
    t_kw, b_kw = capture.model_kwargs()
    base_tok, teacher_tok = load_tokenizer(base, **b_kw), load_tokenizer(teacher, **t_kw)
    return spec.for_tokenizer(base_tok), records, base_tok, teacher_tok


def _config_layers(capture: Capture, base: str, teacher: str) -> tuple[tuple[list[int], list[int]] | None, int | None]:
    """The layer lists checked against the configs' layer counts, before any weights load (again after, where a
    config does not say): the (layers, teacher layers) asked for with their defaults resolved (None where the
    configs do not give what that needs), and the teacher's layer count by its config."""
    t_kw, b_kw = capture.model_kwargs()
    layers, teacher_layers = capture.layers, capture.teacher_layers
    n_b, n_t = decoder_layer_count(base, **b_kw), decoder_layer_count(teacher, **t_kw)
    check_layers(layers, teacher_layers, n_b, n_t)
    known = bool(layers or n_b is not None) and bool(teacher_layers or None not in (n_b, n_t))
    return (resolve_layers(layers, teacher_layers, n_b, n_t) if known else None), n_t


def _plan(examples, teacher: str, base: str, capture: Capture, fusion: Fusion, tree: Tree, disk: Disk, dtype: str,
          kd: bool, batch_size: int, seed: int, asked: tuple[list[int], list[int]] | None,
          source: dict | None, out: str | None = None) -> Plan | None:
    """The disk plan (extraction/budget.py) when a sample is asked for (``disk``), the ``source`` fixed one, or the
    plan alone is (``dry_run``); None otherwise. A resumed capture keeps the sample its run.json records (its budget
    settings were checked equal before): the sample also depends on the tree's settings (N, max_rows, the gate's
    rank), which a resume may change, and another sample would refuse the shards already captured."""
    fixed = (source or {}).get("state_examples")
    if fixed is None and out is not None:
        fixed = Extraction(out).state_examples()
    if not (disk.sampled() or disk.dry_run or fixed is not None):
        return None
    if asked is None:
        raise ToEError("the models' configs do not give their layer counts: pass --layers and --teacher_layers "
                       "to plan the disk (--max_disk, --state_tokens, --dry_run)")
    plan = disk_plan(examples, teacher, base, capture, fusion, tree, disk, dtype, kd, batch_size, seed, len(asked[0]),
                     fixed, reused=source is not None)
    if not disk.dry_run:  # a dry run returns the plan, which the CLI prints
        log.info("extraction plan:\n%s", plan.text())
    return plan


def _load_models(base: str, teacher: str, dtype: str, dev: torch.device, capture: Capture, teacher_map=None,
                 captured: bool = False):
    """The base and the teacher: None under --reuse_capture (the states come from the source's shards: the teacher is
    never loaded) or when every shard is ``captured`` already (the build alone is left), the base itself when the
    same model is read twice (the no-teacher control: loaded once, and one forward serves both without top-k);
    ``teacher_map`` spreads the teacher over devices (--teacher_device_map)."""
    t_kw, b_kw = capture.model_kwargs()
    base_model = load_causal_lm(base, dtype=dtype, device=str(dev), **b_kw)
    if capture.reuse_capture or captured:
        return base_model, None
    same_model = teacher == base and t_kw == b_kw and teacher_map is None
    return base_model, base_model if same_model else load_causal_lm(teacher, dtype=dtype, device=str(dev),
                                                                     device_map=teacher_map, **t_kw)


def _loaded_layers(capture: Capture, base_model, teacher_model, n_t_config: int | None) -> tuple[list[int], list[int]]:
    """The injection layers and the teacher layer for each, resolved and checked against the loaded models (the
    teacher's config count under --reuse_capture, where no teacher loads)."""
    n_b = len(decoder_layers(base_model))
    n_t = n_t_config if teacher_model is None else len(decoder_layers(teacher_model))
    layers, teacher_layers = resolve_layers(capture.layers, capture.teacher_layers, n_b, n_t)
    check_layers(layers, teacher_layers, n_b, n_t)
    return layers, teacher_layers


def _pairing(early: dict, capture: Capture, source: dict | None, teacher: str, kd: bool, base_model, teacher_model,
             n_t_config: int | None, sample: list[int] | None) -> tuple[Pairing, list[int] | None]:
    """What the extraction pairs once the models are loaded, with run.json's settings (:func:`run_record`), and under
    --reuse_capture where the asked pairs sit among the source's (``source``: its run.json, checked to be of this
    base's architecture)."""
    layers, teacher_layers = _loaded_layers(capture, base_model, teacher_model, n_t_config)
    which = reused_pairs(capture.reuse_capture, source, layers, teacher_layers) if source is not None else None
    t_config = teacher_model.config if teacher_model is not None else None if source else \
        load_config(teacher, "teacher", **capture.model_kwargs()[0])  # (every shard captured: no teacher loaded)
    settings = run_record(early, layers, teacher_layers,
                          source["teacher_arch"] if source else arch_fingerprint(t_config)[1],
                          arch_fingerprint(base_model.config)[1], sample)
    if source is not None:
        check_same_base(capture.reuse_capture, source, settings["base_arch"])
    return Pairing(layers, teacher_layers, teacher, kd, settings), which


def _capture_shards(out: str, state, groups: list, base_model, teacher_model, pairing: Pairing, capture: Capture,
                    batch_size: int, pad: int, keep_low: bool, which: list[int] | None,
                    index: dict | None = None) -> None:
    """Step 1, this process's shards (shard s goes to process s % world; finished shards are skipped on resume), and
    its timings. Under a sample, the sampled examples' full shards come first, then light ones (extraction/budget.py)
    holding the base's state at the lowest layer where ``keep_low``. Under --reuse_capture (``which``: where the
    asked pairs sit among the source's) each shard is the source's with those pairs alone, or, for a budget over a
    source that kept every example's states (``index``: where its examples sit), gathered from it per example."""
    layers = pairing.layers
    low = min(range(len(layers)), key=lambda j: layers[j]) if keep_low else None
    mine = [s for s in range(len(groups)) if s % state.num_processes == state.process_index]
    record = os.path.join(out, f"timings-{state.process_index}.json")
    timings = timings_so_far(record)
    for s in tqdm(mine, desc="extract shards", disable=None if state.is_local_main_process else True):
        path = _shard(out, s)
        if os.path.exists(path):
            continue
        t_start, shard_t = time.perf_counter(), {"teacher_s": 0.0, "base_s": 0.0, "tokens": 0}
        if index is not None:
            chunk, full = groups[s]
            tensors = resampled_shard(index, [e.index for e in chunk], full, which, low)
        elif which is not None:
            tensors = layer_subset(capture.reuse_capture, os.path.basename(path), which, layers)
        else:
            chunk, full = groups[s]
            tensors = capture_shard(chunk, teacher_model, base_model, layers, pairing.teacher_layers, batch_size,
                                    capture.topk_logprobs, pad, pairing.kd, shard_t, full=full, low=low)
        atomic_save_tensors(path, tensors)
        timings = add_shard_timings(timings, s, {**shard_t, "wall_s": time.perf_counter() - t_start}, peak_memory())
        timings.update({"reused_capture": os.path.abspath(capture.reuse_capture)} if capture.reuse_capture else {})
        atomic_write_json(record, timings)  # after every shard: a kill loses one shard's time, not the run's
    if not os.path.exists(record):  # every shard of this process was there already
        atomic_write_json(record, timings)


def _shard(out: str, s: int) -> str:
    return os.path.join(out, "shards", f"shard-{s:05d}.safetensors")


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


