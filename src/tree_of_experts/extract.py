"""`toe extract`: paired hidden states -> projector (ridge, then trained) -> tree + bank -> an untrained plug-in.

Output folder layout::

    run.json                 settings of this extraction (a rerun with other settings is refused)
    shards/shard-00000.safetensors ...   fp16 teacher/base states per token, ids, masks, teacher top-k log-probs
    manifest.json            models, revisions, layers, data hash, counts, timings, shard list
    projector.safetensors    ridge map and trained fusion map per layer
    route_data.safetensors   sampled base states, their leaf ids and path branches (Stage A supervision)
    toe_config.json, toe_model.safetensors, README.md   the plug-in (gate initialised from the geometry, s = 0)
    summary.json, summary.md projector fit, O1 dev CE table, cluster sizes, effective leaves, throughput

`toe rebuild --source EXTRACTION --out NEW --num_leaves N --shape deep` redoes only the tree and bank from an
extraction's shards and trained fusion map (sweeps over N and shape without running the teacher again).
"""

from __future__ import annotations

import dataclasses
import gc
import glob
import json
import math
import os
import time
from collections.abc import Iterator

import torch
from tqdm.auto import tqdm

from .bank import ExpertBank
from .capture import Example, capture_shard, default_layer, prepare, same_vocab, teacher_layer_for  # noqa: F401
from .cluster import balanced_tree, init_gate_from_geometry, leaf_means, mass_ordered_clusters
from .config import ExtractConfig, RebuildConfig, ToEError, check_leaves_fit
from .data import DataSpec, file_hash, read_jsonl
from .fusion import batches, collate, example_ce, mean_ce, train_fusion_maps  # noqa: F401
from .hf import (
    arch_fingerprint,
    decoder_layers,
    load_causal_lm,
    load_tokenizer,
    model_id,
)
from .io import (
    atomic_save_tensors,
    atomic_write_json,
    atomic_write_text,
    check_extraction,
    claim_out,
    load_tensors,
    read_json,
)
from .model import ToEModel, new_config
from .plugin import ToEPlugin
from .projector import FusionMap, GramAccumulator, fit_ridge, ridge_delta
from .store import CORRUPT, Extraction
from .tree import effective_leaves, path_table


def shard_paths(out: str) -> list[str]:
    return Extraction(out).shard_paths()


def iter_shards(out: str) -> Iterator[dict[str, torch.Tensor]]:
    return Extraction(out).iter_shards()


def iter_examples(out: str, which: set[int] | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """Per-example slices of the shards (only examples in ``which`` when given); see :class:`store.Extraction`."""
    return Extraction(out).iter_examples(which)


# -- the command --------------------------------------------------------------------------------------------------
CORRUPT_EXTRACTION = CORRUPT  # kept for callers of the old name


def check_same_extraction(out: str, settings: dict) -> None:
    """Refuses to continue the extraction in ``out`` with other ``settings`` (those given), naming them."""
    run_path = os.path.join(out, "run.json")
    if not os.path.isfile(run_path):
        return
    previous = read_json(run_path, "delete the folder (or pass --overwrite) and extract again")
    changed = sorted(k for k in settings if previous.get(k) != settings[k])
    if changed:
        raise ToEError(f"{out} holds an extraction with other settings ({', '.join(changed)}): pass --overwrite to "
                       "replace it, or a new --out")


def clustered_rows(examples: list[Example], heldout_frac: float, sample_rate: float, max_rows: int) -> int:
    """About how many tokens step 4 clusters: the training examples' usable positions (aligned, not the first),
    times ``sample_rate``, at most ``max_rows``; known once the data is tokenized, before any model loads."""
    every = round(1 / heldout_frac) if heldout_frac > 0 else 0
    usable = sum(int((e.align[1:] >= 0).sum()) for e in examples if not (every and e.index % every == every - 1))
    return min(max_rows, int(usable * sample_rate))


def extract(
    teacher: str,
    base: str,
    data: str,
    out: str,
    num_leaves: int = 64,
    shape: str = "balanced",
    layers: list[int] | None = None,
    teacher_layers: list[int] | None = None,
    sample_rate: float = 1.0,
    max_rows: int = 200_000,
    limit: int | None = None,
    heldout_frac: float = 0.1,
    prompt_field: str = "question",
    response_field: str = "answer",
    template: str = "Question: {prompt}\nAnswer: ",
    strip_calc: bool = False,
    max_length: int = 512,
    batch_size: int = 8,
    shard_size: int = 64,
    topk_logprobs: int = 32,
    projector_epochs: int = 1,
    projector_lr: float = 1e-3,
    ridge_lambdas: tuple[float, ...] = (0.25, 0.5, 1.0),
    gate_rank: int = 64,
    top_k: int = 4,
    selection: str = "topk",
    dtype: str = "float32",
    device: str | None = None,
    seed: int = 0,
    teacher_gguf_file: str | None = None,
    base_gguf_file: str | None = None,
    overwrite: bool = False,
) -> dict | None:
    """Builds an expert bank and tree from a teacher, a base and reasoning text.

    Args:
        teacher: hub id or local folder of the teacher.
        base: hub id or local folder of the base.
        data: JSONL with one reasoning example per row (GSM8K's question/answer by default).
        out: output folder; rerunning with the same settings resumes from the last complete shard.
        num_leaves: N leaves of the tree.
        shape: "balanced" (ToE-B) or "deep" (ToE-D).
        layers: base injection layers (default: the middle layer).
        teacher_layers: teacher layers read for each injection layer (default: same relative depth).
        sample_rate: fraction of training tokens used for clustering.
        max_rows: cap on the tokens clustered (memory bound).
        limit: use only the first ``limit`` rows of ``data``.
        heldout_frac: fraction of examples held out for λ selection and the O1 CE table.
        prompt_field: record field holding the question (GSM8K: "question", MATH: "problem").
        response_field: record field holding the reasoning trace (GSM8K: "answer"; `toe traces` output: "trace").
        template: prompt template with ``{prompt}`` where the question goes, or "chat" for the base tokenizer's chat
            template.
        strip_calc: drop GSM8K's ``<<48/2=24>>`` calculator notes from responses.
        max_length: truncate examples to this many tokens.
        batch_size: sequences per forward.
        shard_size: examples per shard file.
        topk_logprobs: teacher top-k log-probs cached per token for distillation (0: none).
        projector_epochs: epochs of the trained fusion map.
        projector_lr: learning rate of the trained fusion map.
        ridge_lambdas: interpolation weights λ of the untrained O1 injection λ (P(u) - h) to report.
        gate_rank: r of the gate trunk.
        top_k: K of the plug-in (leaves selected per token).
        selection: routing mode of the plug-in: "dense", "topk", "topp" or "beam".
        dtype: dtype to run both models in: "float32", "float16", "bfloat16" or "auto" (as stored).
        device: device (default: the accelerate process's device).
        seed: seed for sampling, clustering and the projector's data order.
        teacher_gguf_file: load the teacher from this GGUF file inside the ``teacher`` folder.
        base_gguf_file: load the base from this GGUF file inside the ``base`` folder.
        overwrite: replace what another run (or an extraction with other settings) left in ``out``.

    Returns:
        The summary dict (on the main process; None on the others under ``accelerate launch``).
    """
    from accelerate import PartialState

    ExtractConfig.from_args(locals())
    state = PartialState(cpu=not torch.cuda.is_available())  # cpu=True: gloo process group under torchrun
    if state.is_main_process:
        claim_out(out, "extract", overwrite=overwrite, inputs={"teacher": teacher, "base": base})
    state.wait_for_everyone()
    dev = torch.device(device) if device else state.device
    spec = DataSpec(prompt_field, response_field, template, strip_calc)
    records = read_jsonl(data, spec, limit)
    t_kw = {"gguf_file": teacher_gguf_file} if teacher_gguf_file else {}
    b_kw = {"gguf_file": base_gguf_file} if base_gguf_file else {}
    base_tok, teacher_tok = load_tokenizer(base, **b_kw), load_tokenizer(teacher, **t_kw)
    spec = spec.for_tokenizer(base_tok)  # one prompt text for both models, in the base's format
    kd = same_vocab(base_tok, teacher_tok) and topk_logprobs > 0
    early = {"teacher": teacher, "base": base, "data_sha256": file_hash(data), "limit": limit,
             "spec": dataclasses.asdict(spec), "max_length": max_length, "shard_size": shard_size,
             "topk_logprobs": topk_logprobs if kd else 0, "dtype": dtype,
             **({"layers": list(layers)} if layers else {}),
             **({"teacher_layers": list(teacher_layers)} if teacher_layers else {})}
    check_same_extraction(out, early)  # what can be compared before the models load
    examples = prepare(records, spec, base_tok, teacher_tok, max_length)
    check_leaves_fit(num_leaves, shape, clustered_rows(examples, heldout_frac, sample_rate, max_rows))
    base_model = load_causal_lm(base, dtype=dtype, device=str(dev), **b_kw)
    teacher_model = load_causal_lm(teacher, dtype=dtype, device=str(dev), **t_kw)
    n_b, n_t = len(decoder_layers(base_model)), len(decoder_layers(teacher_model))
    layers = list(layers) if layers else [default_layer(n_b)]
    teacher_layers = list(teacher_layers) if teacher_layers else [teacher_layer_for(ell, n_b, n_t) for ell in layers]
    if len(teacher_layers) != len(layers):
        raise ToEError(f"teacher_layers={teacher_layers} needs one entry per injection layer in layers={layers}")
    for name, ls, n in (("layers", layers, n_b), ("teacher_layers", teacher_layers, n_t)):
        if any(not 0 <= x < n for x in ls):
            raise ToEError(f"{name}={ls} out of range: that model has {n} decoder layers (0..{n - 1})")
    settings = {
        "teacher": teacher, "base": base, "data_sha256": file_hash(data), "limit": limit, "spec": dataclasses.asdict(spec),
        "layers": layers, "teacher_layers": teacher_layers, "max_length": max_length, "shard_size": shard_size,
        "topk_logprobs": topk_logprobs if kd else 0, "dtype": dtype,
        "teacher_arch": arch_fingerprint(teacher_model.config)[1], "base_arch": arch_fingerprint(base_model.config)[1],
    }
    os.makedirs(os.path.join(out, "shards"), exist_ok=True)
    run_path = os.path.join(out, "run.json")
    if state.is_main_process:
        if os.path.isfile(run_path):
            check_same_extraction(out, settings)
        else:
            atomic_write_json(run_path, settings)
    state.wait_for_everyone()

    # 1. Capture: shard s goes to process s % world; finished shards are skipped on resume.
    n_shards = math.ceil(len(examples) / shard_size)
    mine = [s for s in range(n_shards) if s % state.num_processes == state.process_index]
    timings = {"teacher_s": 0.0, "base_s": 0.0, "tokens": 0, "wall_s": 0.0}
    pad = base_tok.pad_token_id
    t_start = time.perf_counter()
    for s in tqdm(mine, desc="extract shards", disable=None if state.is_local_main_process else True):
        path = os.path.join(out, "shards", f"shard-{s:05d}.safetensors")
        if os.path.exists(path):
            continue
        tensors = capture_shard(examples[s * shard_size : (s + 1) * shard_size], teacher_model, base_model, layers,
                                teacher_layers, batch_size, topk_logprobs, pad, kd, timings)
        atomic_save_tensors(path, tensors)
    timings["wall_s"] = time.perf_counter() - t_start
    atomic_write_json(os.path.join(out, f"timings-{state.process_index}.json"), timings)
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    del teacher_model
    gc.collect()  # the teacher's memory back before the fusion map trains (it can be most of the RSS)
    return build(out, base_model, base_tok, layers, teacher_layers, settings, examples, num_leaves, shape, sample_rate,
                 max_rows, heldout_frac, projector_epochs, projector_lr, ridge_lambdas, gate_rank, top_k, selection,
                 seed, kd, teacher, dev)


def build(out, base_model, base_tok, layers, teacher_layers, settings, examples, num_leaves, shape, sample_rate,
          max_rows, heldout_frac, projector_epochs, projector_lr, ridge_lambdas, gate_rank, top_k, selection, seed, kd,
          teacher, dev) -> dict:
    """Steps 2-4 on the main process, from the shards alone."""
    pad = base_tok.pad_token_id
    every = round(1 / heldout_frac) if heldout_frac > 0 else 0
    heldout = {e.index for e in examples if every and e.index % every == every - 1}
    train_ids = {e.index for e in examples} - heldout
    times: dict[str, float] = {}

    # 2. Ridge map per layer from streamed Gram matrices.
    t0 = time.perf_counter()
    d_t = next(iter_shards(out))["teacher.0"].shape[1]
    d_b = base_model.config.hidden_size
    grams = [(GramAccumulator(d_t, d_b), GramAccumulator(d_t, d_b)) for _ in layers]
    for shard in tqdm(list(iter_shards(out)), desc="ridge", leave=False, disable=None):
        rows = shard["valid"].bool()
        held = torch.tensor([int(x) in heldout for x in shard["example"]]) & rows
        for j, (tr, ho) in enumerate(grams):
            u, v = shard[f"teacher.{j}"].float(), shard[f"base.{j}"].float()
            tr.add(u[rows & ~held], v[rows & ~held])
            if held.any():
                ho.add(u[held], v[held])
    ridge = [fit_ridge(tr, ho) for tr, ho in grams]
    times["ridge_s"] = time.perf_counter() - t0

    # 3. Trained fusion map A(u, h) = s ⊙ (W u + b - h), and the O1 CE table on held-out examples.
    t0 = time.perf_counter()
    train_data = list(iter_examples(out, train_ids))
    dev_data = list(iter_examples(out, heldout)) if heldout else []
    maps = torch.nn.ModuleList([FusionMap(w) for w, _ in ridge])
    losses = train_fusion_maps(base_model, layers, maps, train_data, pad, projector_epochs, projector_lr, 4, seed)
    times["fusion_map_s"] = time.perf_counter() - t0
    o1 = {}
    if dev_data:
        o1["base"] = mean_ce(base_model, layers, dev_data, pad)
        if kd:
            nll = torch.cat([d["teacher_nll"][d["loss_mask"].bool()] for d in dev_data])
            o1["teacher"] = float(nll.mean())
        for lam in ridge_lambdas:
            o1[f"ridge_lambda_{lam}"] = mean_ce(
                base_model, layers, dev_data, pad,
                lambda j, u, h, lam=lam: ridge_delta(ridge[j][0].to(dev), u, h, lam))
        o1["trained_map"] = mean_ce(base_model, layers, dev_data, pad, lambda j, u, h: maps[j](u, h))
        if "teacher" in o1:
            gap = o1["teacher"] - o1["base"]
            o1["gap_closed"] = {k: (o1["base"] - v) / -gap if abs(gap) > 1e-9 else None
                                for k, v in o1.items() if k not in ("base", "teacher")}
    proj = {}
    for j, layer in enumerate(layers):
        proj[f"ridge.{layer}"] = ridge[j][0]
        for k, v in maps[j].state_dict().items():
            proj[f"trained.{layer}.{k}"] = v
    atomic_save_tensors(os.path.join(out, "projector.safetensors"), proj)
    fit = {"projector": [r for _, r in ridge], "fusion_map_loss_first_last": [losses[0], losses[-1]] if losses else None,
           "o1_heldout_ce": o1}
    counts = {"examples": len(examples), "heldout": sorted(heldout), "tokens": sum(len(e.ids) for e in examples)}
    return build_tree(out, out, base_model, layers, teacher_layers, settings, counts, maps, fit, times, num_leaves,
                      shape, sample_rate, max_rows, gate_rank, top_k, selection, seed, kd, teacher)


def build_tree(out, source, base_model, layers, teacher_layers, settings, counts, maps, fit, times, num_leaves, shape,
               sample_rate, max_rows, gate_rank, top_k, selection, seed, kd, teacher) -> dict:
    """Step 4 (expert signal -> tree -> bank -> geometry-initialised gate) from ``source``'s shards, written to ``out``
    with the summary and manifest."""
    # 4. Expert signal δ on sampled training tokens -> tree -> bank; gate from the geometry.
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(seed)
    deltas: list[list[torch.Tensor]] = [[] for _ in layers]
    states: list[list[torch.Tensor]] = [[] for _ in layers]
    maps.cpu()  # shard rows live on the CPU
    heldout = set(counts["heldout"])
    with torch.no_grad():
        for ex in iter_examples(source):
            if int(ex["example"][0]) in heldout:
                continue
            keep = ex["valid"].bool() & (torch.rand(len(ex["valid"]), generator=g) < sample_rate)
            for j in range(len(layers)):
                h = ex[f"base.{j}"][keep].float()
                deltas[j].append(maps[j](ex[f"teacher.{j}"][keep].float(), h))
                states[j].append(ex[f"base.{j}"][keep])
    config = new_config(base_model, layers=layers, num_leaves=num_leaves, shape=shape, selection=selection,
                        top_k=top_k, gate_rank=gate_rank, teacher_model=teacher, teacher_layers=teacher_layers)
    plugin = ToEPlugin(config)
    route_tensors, clusters = {}, {}
    _, branch_table = path_table(shape, num_leaves)
    for j, layer in enumerate(layers):
        delta, x = torch.cat(deltas[j]), torch.cat(states[j])
        if len(delta) > max_rows:
            pick = torch.randperm(len(delta), generator=g)[:max_rows]
            delta, x = delta[pick], x[pick]
        if len(delta) < num_leaves:
            raise ToEError(f"only {len(delta)} tokens sampled for {num_leaves} leaves: use more data, a higher "
                           "--sample_rate, or fewer --num_leaves")
        if shape == "balanced":
            leaf = balanced_tree(delta, config.depth, seed=seed)
        else:
            leaf = mass_ordered_clusters(delta, num_leaves, seed=seed)
        vectors = leaf_means(delta, leaf, num_leaves)
        sizes = torch.bincount(leaf, minlength=num_leaves)
        block = plugin.blocks[str(layer)]
        block.bank = ExpertBank(vectors, {
            "teacher": teacher, "teacher_layer": teacher_layers[j], "signal": "trained fusion map delta",
            "clustering": "balanced 2-means" if shape == "balanced" else "k-means, ordered by mass",
            "rows": len(delta), "ridge_heldout_r2": round(fit["projector"][j]["heldout_r2"], 4),
        })
        init_gate_from_geometry(block.gate, x.float(), leaf)
        with torch.no_grad():
            routed = block.gate(x.float(), "dense").leaf_logp.argmax(-1)
        clusters[str(layer)] = {
            "sizes": sizes.tolist(),
            "effective_leaves": float(effective_leaves(sizes.float())),
            "mean_delta_norm": float(delta.norm(dim=-1).mean()),
            "mean_state_norm": float(x.float().norm(dim=-1).mean()),
            "gate_init_routing_accuracy": float((routed == leaf).float().mean()),
        }
        route_tensors[f"states.{layer}"] = x.half()
        route_tensors[f"leaf.{layer}"] = leaf
        route_tensors[f"branches.{layer}"] = branch_table[leaf].to(torch.int8)
    times["tree_s"] = time.perf_counter() - t0

    # 5. Write everything.
    atomic_save_tensors(os.path.join(out, "route_data.safetensors"), route_tensors)
    with ToEModel(base_model, plugin) as model:
        model.save_pretrained(out)
    timing_files = sorted(glob.glob(os.path.join(source, "timings-*.json")))
    capture = {"teacher_s": 0.0, "base_s": 0.0, "tokens": 0, "wall_s": 0.0}
    for path in timing_files:
        with open(path) as f:
            t = json.load(f)
        for k in capture:
            capture[k] += t[k] if k != "wall_s" else 0
        capture["wall_s"] = max(capture["wall_s"], t["wall_s"])
    if capture["tokens"]:
        capture["tokens_per_s"] = capture["tokens"] / max(capture["wall_s"], 1e-9)
        capture["teacher_forward_tokens_per_s"] = capture["tokens"] / max(capture["teacher_s"], 1e-9)
        capture["ratio_vs_teacher_forward"] = capture["tokens_per_s"] / capture["teacher_forward_tokens_per_s"]
    summary = {
        "teacher": teacher, "base": model_id(base_model), "layers": layers, "teacher_layers": teacher_layers,
        "examples": counts["examples"], "train_examples": counts["examples"] - len(heldout),
        "heldout_examples": len(heldout), "tokens": counts["tokens"], "num_leaves": num_leaves, "shape": shape,
        **fit, "clusters": clusters, "capture": capture, "times": times, "kd_cached": kd,
    }
    if source != out:
        summary["rebuilt_from"] = source
    manifest = {**settings, "shards": [os.path.relpath(p, out) for p in shard_paths(out)],
                "base_revision": getattr(base_model.config, "_commit_hash", None),
                "counts": counts, "timings": {**times, **capture}}
    atomic_write_json(os.path.join(out, "manifest.json"), manifest)
    atomic_write_json(os.path.join(out, "summary.json"), summary)
    atomic_write_text(os.path.join(out, "summary.md"), summary_markdown(summary))
    return summary


def rebuild(
    source: str,
    out: str,
    num_leaves: int = 64,
    shape: str = "balanced",
    sample_rate: float = 1.0,
    max_rows: int = 200_000,
    gate_rank: int = 64,
    top_k: int = 4,
    selection: str = "topk",
    dtype: str = "float32",
    seed: int = 0,
    overwrite: bool = False,
) -> dict:
    """Builds a new tree and bank from an extraction, without running the teacher again.

    Reuses ``source``'s captured shards (linked, not copied), ridge map, trained fusion map and O1 table; only the
    clustering and the gate's initialisation are redone. This is how sweeps over N, ToE-B vs ToE-D or K cost
    minutes instead of a new capture.

    Args:
        source: a finished `toe extract` folder.
        out: the new extraction folder (usable wherever an extraction is: `toe train --experts OUT`).
        num_leaves: N leaves of the new tree.
        shape: "balanced" (ToE-B) or "deep" (ToE-D).
        sample_rate: fraction of the source's training tokens used for clustering.
        max_rows: cap on the tokens clustered (memory bound).
        gate_rank: r of the gate trunk.
        top_k: K of the plug-in (leaves selected per token).
        selection: routing mode of the plug-in: "dense", "topk", "topp" or "beam".
        dtype: dtype of the base while building: "float32", "float16", "bfloat16" or "auto" (as stored).
        seed: seed for sampling and clustering.
        overwrite: replace what another run left in ``out``.
    """
    RebuildConfig.from_args(locals())
    needed = ("run.json", "manifest.json", "summary.json", "projector.safetensors")
    missing = [f for f in needed if not os.path.isfile(os.path.join(source, f))]
    if missing:
        raise ToEError(f"{source} is not a finished `toe extract` folder (missing {', '.join(missing)}): run "
                       "`toe extract` to the end first")
    if os.path.abspath(source) == os.path.abspath(out):
        raise ToEError("rebuild --out must be a new folder, not the source extraction")
    check_extraction(source, "source")
    settings = read_json(os.path.join(source, "run.json"), CORRUPT_EXTRACTION)
    manifest = read_json(os.path.join(source, "manifest.json"), CORRUPT_EXTRACTION)
    prior = read_json(os.path.join(source, "summary.json"), CORRUPT_EXTRACTION)
    counts = manifest["counts"]
    train_share = 1 - len(counts["heldout"]) / max(counts["examples"], 1)
    check_leaves_fit(num_leaves, shape, min(max_rows, int(prior["tokens"] * train_share * sample_rate)))
    claim_out(out, "rebuild", overwrite=overwrite, inputs={"source": source})
    os.makedirs(out, exist_ok=True)
    link = os.path.join(out, "shards")
    if os.path.islink(link) and os.path.realpath(link) != os.path.realpath(os.path.join(source, "shards")):
        os.remove(link)
    if not os.path.exists(link):
        os.symlink(os.path.abspath(os.path.join(source, "shards")), link)
    atomic_write_json(os.path.join(out, "run.json"), settings)
    base_model = load_causal_lm(settings["base"], dtype=dtype)
    proj = load_tensors(os.path.join(source, "projector.safetensors"), CORRUPT_EXTRACTION)
    layers = prior["layers"]
    maps = torch.nn.ModuleList()
    for layer in layers:
        fm = FusionMap(proj[f"ridge.{layer}"])
        fm.load_state_dict({k.split(".", 2)[2]: v for k, v in proj.items() if k.startswith(f"trained.{layer}.")})
        maps.append(fm)
    atomic_save_tensors(os.path.join(out, "projector.safetensors"), proj)
    fit = {k: prior[k] for k in ("projector", "fusion_map_loss_first_last", "o1_heldout_ce")}
    counts = {"tokens": prior["tokens"], **manifest["counts"]}
    return build_tree(out, source, base_model, layers, prior["teacher_layers"], settings, counts, maps, fit, {},
                      num_leaves, shape, sample_rate, max_rows, gate_rank, top_k, selection, seed, prior["kd_cached"],
                      prior["teacher"])


def summary_markdown(s: dict) -> str:
    lines = [f"# Extraction: {s['teacher']} -> {s['base']}", "",
             f"{s['examples']} examples ({s['heldout_examples']} held out), {s['tokens']} tokens; "
             f"layers {s['layers']} <- teacher {s['teacher_layers']}; {s['shape']} tree, N = {s['num_leaves']}.", ""]
    for p, layer in zip(s["projector"], s["layers"]):
        lines.append(f"Ridge projector (layer {layer}): held-out R² {p['heldout_r2']:.3f}, λ = {p['lambda']:.3g}.")
    if s["o1_heldout_ce"]:
        lines += ["", "| held-out CE (response tokens) | nats |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" for k, v in s["o1_heldout_ce"].items() if isinstance(v, float)]
    for layer, c in s["clusters"].items():
        lines += ["", f"Layer {layer}: effective leaves {c['effective_leaves']:.1f} of {len(c['sizes'])}; "
                      f"cluster sizes min {min(c['sizes'])} / max {max(c['sizes'])}; "
                      f"geometry-initialised gate routes {100 * c['gate_init_routing_accuracy']:.1f} % of tokens "
                      f"to their own leaf; mean ‖δ‖ {c['mean_delta_norm']:.3g} vs ‖h‖ {c['mean_state_norm']:.3g}."]
    cap = s["capture"]
    if cap.get("tokens"):
        lines += ["", f"Capture: {cap['tokens_per_s']:.1f} tokens/s vs {cap['teacher_forward_tokens_per_s']:.1f} "
                      f"for the teacher forward alone (ratio {cap['ratio_vs_teacher_forward']:.2f})."]
    return "\n".join(lines) + "\n"
