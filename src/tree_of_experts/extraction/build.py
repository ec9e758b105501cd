"""Building the tree: clustering expert signals into leaves, and a gate initialised from the geometry.

Also the build steps of `toe extract` / `toe rebuild` (fusion maps, tree, bank, plug-in, summary)."""

from __future__ import annotations

import glob
import json
import os
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..bank import ExpertBank
from ..config import ToEError
from ..hf.hub import model_id
from ..files import atomic_save_tensors, atomic_write_json, atomic_write_text
from ..model import ToEModel
from ..plugin_folder import new_config
from ..options import Fusion, Tree
from ..plugin import ToEPlugin
from ..training.checkpoint import peak_memory
from ..tree import effective_leaves, path_table
from .gate_init import dense_argmax, init_gate_from_geometry
from .capture import Example
from .fusion import (
    FusionMap,
    GramAccumulator,
    expert_signal,
    fit_ridge,
    mean_ce,
    ridge_delta,
    signal_record,
    train_fusion_maps,
)
from .report import summary_markdown
from .rows import sampled_rows
from .store import Extraction, shard_record


def kmeans(x: torch.Tensor, k: int, iters: int = 25, seed: int = 0, n_init: int = 3,
           chunk: int = 65536) -> torch.Tensor:
    """Lloyd's k-means, best of ``n_init`` k-means++ seedings; distances in chunks (memory O(chunk · k)).

    Returns:
        (R,) cluster ids.
    """
    best, best_inertia = None, float("inf")
    for trial in range(n_init):
        labels, inertia = _lloyd(x.float(), k, iters, seed * 1000 + trial, chunk)
        if inertia < best_inertia:
            best, best_inertia = labels, inertia
    return best


def _lloyd(x: torch.Tensor, k: int, iters: int, seed: int, chunk: int) -> tuple[torch.Tensor, float]:
    g = torch.Generator().manual_seed(seed)
    centers = x[torch.randint(len(x), (1,), generator=g)]
    for _ in range(1, k):  # k-means++ on a subsample keeps seeding cheap for millions of rows
        sub = x[torch.randint(len(x), (min(len(x), 20000),), generator=g)]
        d = torch.cdist(sub, centers).min(1).values ** 2
        centers = torch.cat([centers, sub[torch.multinomial(d + 1e-12, 1, generator=g)]])
    labels = assign(x, centers, chunk)
    for _ in range(iters):
        sums = torch.zeros_like(centers).index_add_(0, labels, x)
        counts = torch.bincount(labels, minlength=k).float()
        empty = counts == 0
        centers = torch.where(empty[:, None], centers, sums / counts.clamp_min(1)[:, None])
        new = assign(x, centers, chunk)
        if torch.equal(new, labels):
            break
        labels = new
    inertia = sum(float(((x[i : i + chunk] - centers[labels[i : i + chunk]]) ** 2).sum())
                  for i in range(0, len(x), chunk))
    return labels, inertia


def assign(x: torch.Tensor, centers: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
    return torch.cat([torch.cdist(x[i : i + chunk], centers).argmin(1) for i in range(0, len(x), chunk)])


def balanced_tree(x: torch.Tensor, depth: int, iters: int = 10, seed: int = 0) -> torch.Tensor:
    """ToE-B leaves by recursive balanced 2-means: each node splits its rows in two equal halves.

    At each node, 2-means finds the split direction (difference of the two centroids); the rows are then cut at
    the median of their projection on it, so every leaf gets R / 2^depth rows (±1).

    Returns:
        (R,) leaf ids in [0, 2^depth), bit l (from the top) = branch taken at level l.
    """
    leaf = torch.zeros(len(x), dtype=torch.long)
    for level in range(depth):
        parent = leaf.clone()  # node ids at this level; `leaf` becomes the next level's ids
        for node in range(2**level):
            rows = (parent == node).nonzero().squeeze(1)
            if len(rows) < 2:
                leaf[rows] = 2 * node
                continue
            xs = x[rows].float()
            two = kmeans(xs, 2, iters=iters, seed=seed + level * 7919 + node, n_init=1)
            c0 = xs[two == 0].mean(0) if (two == 0).any() else xs.mean(0)
            c1 = xs[two == 1].mean(0) if (two == 1).any() else xs.mean(0)
            direction = c1 - c0
            if direction.norm() < 1e-12:  # identical points: any equal split will do
                direction = torch.randn(x.shape[1], generator=torch.Generator().manual_seed(seed))
            order = (xs @ direction).argsort()
            right = torch.zeros(len(rows), dtype=torch.long)
            right[order[len(rows) // 2 :]] = 1
            leaf[rows] = 2 * node + right
    return leaf


def mass_ordered_clusters(x: torch.Tensor, num_leaves: int, seed: int = 0) -> torch.Tensor:
    """ToE-D leaves: k-means clusters renumbered so leaf 0 has the most rows (taken first by the caterpillar)."""
    labels = kmeans(x, num_leaves, seed=seed)
    counts = torch.bincount(labels, minlength=num_leaves)
    rank = torch.empty_like(counts)
    rank[counts.argsort(descending=True, stable=True)] = torch.arange(num_leaves)
    return rank[labels]


def leaf_means(x: torch.Tensor, leaf: torch.Tensor, num_leaves: int) -> torch.Tensor:
    """(N, D) mean of each leaf's rows (zero for an empty leaf)."""
    sums = torch.zeros(num_leaves, x.shape[1]).index_add_(0, leaf, x.float())
    return sums / torch.bincount(leaf, minlength=num_leaves).clamp_min(1).float()[:, None]


def clustered_rows(examples: list[Example], heldout_frac: float, sample_rate: float, max_rows: int,
                   sample: list[int] | None = None) -> int:
    """About how many tokens step 4 clusters: the training examples' usable positions (aligned, not the first; of
    the examples in ``sample`` only, when given), times ``sample_rate``, at most ``max_rows``; known once the data is
    tokenized, before any model loads."""
    every = round(1 / heldout_frac) if heldout_frac > 0 else 0
    keep = set(sample) if sample is not None else None
    usable = sum(int((e.align[1:] >= 0).sum()) for e in examples
                 if not (every and e.index % every == every - 1) and (keep is None or e.index in keep))
    return min(max_rows, int(usable * sample_rate))


@dataclass(frozen=True)
class Pairing:
    """What an extraction paired: the injection layers, the teacher layer read for each, the teacher (recorded in
    the plug-in), whether the teacher's top-k was cached (same vocabulary), and the run's recorded settings."""

    layers: list[int]
    teacher_layers: list[int]
    teacher: str
    kd: bool
    settings: dict


def build(out: str, base_model, base_tok, tree: Tree, fusion: Fusion, pairing: Pairing, examples: list[Example],
          seed: int, dev: torch.device, plan: dict | None = None) -> dict:
    """Steps 2-4 on the main process, from the shards alone: ridge map, trained fusion map with the O1 CE table on
    held-out examples (``fusion``), then the tree (`build_tree`, with ``tree``). Every step reads the examples with
    states (under a disk budget, the sample: all held-out examples and some training ones); ``plan``
    (extraction/budget.py) is recorded in the summary."""
    layers, kd = pairing.layers, pairing.kd
    pad = base_tok.pad_token_id
    every = round(1 / fusion.heldout_frac) if fusion.heldout_frac > 0 else 0
    heldout = {e.index for e in examples if every and e.index % every == every - 1}
    train_ids = {e.index for e in examples} - heldout
    times: dict[str, float] = {}

    # 2. Ridge map per layer from streamed Gram matrices (one shard in memory at a time).
    t0 = time.perf_counter()
    extraction = Extraction(out)
    d_t = next(extraction.iter_shards(with_states=True))["teacher.0"].shape[1]
    d_b = base_model.config.hidden_size
    grams = [(GramAccumulator(d_t, d_b), GramAccumulator(d_t, d_b)) for _ in layers]
    n_full = sum(1 for _ in extraction.iter_shard_paths(with_states=True))
    for shard in tqdm(extraction.iter_shards(with_states=True), total=n_full, desc="ridge", leave=False, disable=None):
        rows = shard["valid"].bool()
        held = torch.tensor([int(x) in heldout for x in shard["example"]]) & rows
        for j, (tr, ho) in enumerate(grams):
            u, v = shard[f"teacher.{j}"].float(), shard[f"base.{j}"].float()
            tr.add(u[rows & ~held], v[rows & ~held])
            if held.any():
                ho.add(u[held], v[held])
    ridge = [fit_ridge(tr, ho) for tr, ho in grams]
    del grams
    times["ridge_s"] = time.perf_counter() - t0

    # 3. Trained fusion map A(u, h) = s ⊙ (W u + b - h), and the O1 CE table on held-out examples.
    t0 = time.perf_counter()
    # the examples stay in their shards, read a batch at a time: the step's memory does not grow with the sample
    fields = ("input_ids", "loss_mask", "valid", *(f"teacher.{j}" for j in range(len(layers))))
    train_data = extraction.example_slices(train_ids, fields)
    dev_data = extraction.example_slices(heldout, fields) if heldout else []
    maps = torch.nn.ModuleList([FusionMap(w) for w, _ in ridge])
    steps = fusion.projector_epochs * -(-len(train_ids) // 4)  # the corpus's, on a state sample too (4 a step)
    losses, pick = train_fusion_maps(base_model, layers, maps, train_data, pad, steps, fusion.projector_lr, 4, seed,
                                     dev_data)
    times["fusion_map_s"] = time.perf_counter() - t0
    o1 = {}
    if dev_data:
        o1["base"] = mean_ce(base_model, layers, dev_data, pad)
        if kd:
            nll = torch.cat([d["teacher_nll"][d["loss_mask"].bool()]
                             for d in extraction.example_slices(heldout, ("teacher_nll", "loss_mask"))])
            o1["teacher"] = float(nll.mean())
        for lam in fusion.ridge_lambdas:
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
    fit = {"projector": [r for _, r in ridge], "fusion_map_steps": len(losses),
           **({"fusion_map_pick": pick} if pick else {}),  # a sample's passes, picked by held-out CE
           "fusion_map_loss_first_last": [losses[0], losses[-1]] if losses else None, "o1_heldout_ce": o1}
    counts = {"examples": len(examples), "heldout": sorted(heldout), "tokens": sum(len(e.ids) for e in examples)}
    sample = pairing.settings.get("state_examples")
    if sample is not None:  # the examples (and tokens) whose states the steps above and the tree read
        keep = set(sample)
        counts.update(state_examples=len(keep), state_tokens=sum(len(e.ids) for e in examples if e.index in keep))
    if plan is not None:
        fit["disk_plan"] = plan
    return build_tree(out, out, base_model, tree, pairing, counts, maps, [w for w, _ in ridge], fit, times, seed)


def build_tree(out: str, source: str, base_model, tree: Tree, pairing: Pairing, counts: dict,
               maps: torch.nn.ModuleList, ridge: list[torch.Tensor], fit: dict, times: dict, seed: int) -> dict:
    """Step 4 (expert signal -> tree -> bank -> geometry-initialised gate) from ``source``'s shards, written to ``out``
    with the summary and manifest. The signal is ``tree.signal``: the trained fusion maps ``maps`` or the ridge step
    λ (P(u) - h) with the ridge weights ``ridge``."""
    layers, teacher_layers, settings = pairing.layers, pairing.teacher_layers, pairing.settings
    kd, teacher = pairing.kd, pairing.teacher
    num_leaves, shape, sample_rate, max_rows = tree.num_leaves, tree.shape, tree.sample_rate, tree.max_rows
    gate_rank, top_k, selection = tree.gate_rank, tree.top_k, tree.selection
    # 4. Expert signal δ on sampled training tokens -> tree -> bank; gate from the geometry.
    t0 = time.perf_counter()
    maps.cpu()  # shard rows live on the CPU
    signal = expert_signal(tree.signal, maps, [w.cpu() for w in ridge], tree.signal_lambda)
    signal_name = "trained fusion map delta" if tree.signal == "fusion_map" else f"ridge step, λ = {tree.signal_lambda}"
    heldout = set(counts["heldout"])
    delta_rows, state_rows, where_rows = sampled_rows(Extraction(source), heldout, list(range(len(layers))),
                                                       signal, sample_rate, max_rows, seed)
    config = new_config(base_model, layers=layers, num_leaves=num_leaves, shape=shape, selection=selection,
                        top_k=top_k, gate_rank=gate_rank, teacher_model=teacher, teacher_layers=teacher_layers)
    plugin = ToEPlugin(config)
    route_tensors, clusters = {}, {}
    _, branch_table = path_table(shape, num_leaves)
    for j, layer in enumerate(layers):
        delta, x, at = delta_rows[j], state_rows[j], where_rows[j]
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
            "teacher": teacher, "teacher_layer": teacher_layers[j], "signal": signal_name,
            "clustering": "balanced 2-means" if shape == "balanced" else "k-means, ordered by mass",
            "rows": len(delta), "ridge_heldout_r2": round(fit["projector"][j]["heldout_r2"], 4),
        })
        init_gate_from_geometry(block.gate, x.float(), leaf)
        routed = dense_argmax(block.gate, x.float())
        clusters[str(layer)] = {
            "sizes": sizes.tolist(),
            "effective_leaves": float(effective_leaves(sizes.float())),
            "mean_delta_norm": float(delta.norm(dim=-1).mean()),
            "mean_state_norm": float(x.float().norm(dim=-1).mean()),
            "gate_init_routing_accuracy": float((routed == leaf).float().mean()),
        }
        if settings.get("state_budget") is None:
            route_tensors[f"states.{layer}"] = x.half()
        else:  # under a disk budget the states stay in the shards alone: the route data says where (store.py)
            route_tensors[f"rows.{layer}"] = at
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
        for k in ("teacher_s", "base_s", "tokens"):
            capture[k] += t[k]
        capture["wall_s"] = max(capture["wall_s"], t["wall_s"])
        if "reused_capture" in t:  # `toe extract --reuse_capture`: the states came from that extraction's shards
            capture["reused_from"] = t["reused_capture"]
        if "peak_rss_gib" in t:  # the capturing process's high-water mark (the largest over processes)
            capture["peak_rss_gib"] = max(capture.get("peak_rss_gib", 0.0), t["peak_rss_gib"])
    if capture["tokens"]:
        capture["tokens_per_s"] = capture["tokens"] / max(capture["wall_s"], 1e-9)
        capture["teacher_forward_tokens_per_s"] = capture["tokens"] / max(capture["teacher_s"], 1e-9)
        capture["ratio_vs_teacher_forward"] = capture["tokens_per_s"] / capture["teacher_forward_tokens_per_s"]
    summary = {
        "teacher": teacher, "base": model_id(base_model), "layers": layers, "teacher_layers": teacher_layers,
        "examples": counts["examples"], "train_examples": counts["examples"] - len(heldout),
        "heldout_examples": len(heldout), "tokens": counts["tokens"], "num_leaves": num_leaves, "shape": shape,
        **({"state_sample": {"examples": counts["state_examples"], "tokens": counts["state_tokens"]}}
           if "state_tokens" in counts else {}),
        **fit, "clusters": clusters, "capture": capture, "times": times, "kd_cached": kd,
        "signal": signal_record(tree.signal, tree.signal_lambda),
        "memory": peak_memory(),  # this process's peak: the build's, and the capture's where it ran in it too
    }
    if source != out:
        summary["rebuilt_from"] = source
    shards = [os.path.relpath(p, out) for p in Extraction(out).shard_paths()]
    manifest = {**settings, "shards": shards,  # each shard's size and hash: a rerun of `toe extract` checks them
                "shard_files": {rel: shard_record(os.path.join(out, rel)) for rel in shards},
                "base_revision": getattr(base_model.config, "_commit_hash", None),
                "counts": counts, "timings": {**times, **capture}}
    atomic_write_json(os.path.join(out, "manifest.json"), manifest)
    atomic_write_json(os.path.join(out, "summary.json"), summary)
    atomic_write_text(os.path.join(out, "summary.md"), summary_markdown(summary))
    return summary
