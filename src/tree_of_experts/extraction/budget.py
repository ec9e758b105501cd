"""An extraction's disk and memory, planned from the tokenized data and the models' configs before any weight loads:
which examples keep their full states (`toe extract --max_disk / --state_tokens / --dry_run`).

Every example keeps its *light* fields: ids, masks, the teacher's top-k (``--topk_logprobs``) and, with
``--cache_low_states``, the base's state at the lowest injection layer (what `toe train --cached_states` reads).
The *full* states (base and teacher at every injection layer: the GB-scale part) are kept for a **sample** of the
examples only: every held-out example, then training examples in an order fixed by ``--seed`` while their tokens fit
the sample's size S. Everything that reads states (ridge Grams, fusion maps, clustering, route data, predictability,
state targets) reads the sample; everything that reads light fields reads every example. The formulas (docs/scale.md;
T tokens, L injection layers, D_B / D_T widths, k the top-k, S the sample's tokens, N leaves):

    light bytes/token = 18 + [kd] (4 + 6 k) + [low] 2 D_B
    full bytes/token  = 18 + [kd] (4 + 6 k) + 2 L (D_B + D_T)
    disk = T · light + S · (full − light) + L · R · (2 D_B + 8 + depth) + projector + plug-in + headers and records
           R = min(max_rows, training tokens of the sample): the route data's rows (an upper bound)

Axes as elsewhere: B batch, T tokens, D hidden, N leaves, L layers.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..errors import ToEError
from ..hf.loading import load_config
from ..options import Capture, Disk, Fusion, Tree
from ..shapes import capture_bytes_per_token
from ..tree import tree_depth
from .capture import Example

UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
PYTHON_RUNTIME = 600 * 10**6  # what Python, torch and transformers hold before any tensor (not in the estimate)
DISTANCE_CHUNK = 65536  # rows per distance block of k-means (build.assign)
FUSION_BATCH = 4  # sequences per step of the fusion map's training (build.build)


def parse_size(text: str | int) -> int:
    """``2GB``, ``500MB``, ``750KB`` (powers of 1000), ``1GiB`` (of 1024) or a byte count -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]i?b|b)?\s*", str(text).lower())
    if not m or (m.group(2) or "") not in UNITS or float(m.group(1)) <= 0:
        raise ToEError(f"--max_disk {text!r}: give a size such as 2GB, 500MB, 750KB (powers of 1000), 1GiB (of 1024) "
                       "or a byte count")
    return int(float(m.group(1)) * UNITS[m.group(2) or ""])


def human(n: float) -> str:
    """Bytes in the units --max_disk reads (powers of 1000)."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g} {unit}"
    return f"{int(n)} B"


@dataclass(frozen=True)
class Sizes:
    """What the plan needs from the two models' configs (no weights): widths, depths, vocabulary, MLP widths and the
    weights' bytes in the run's dtype."""

    d_b: int
    d_t: int
    layers_b: int
    vocab: int
    inter_b: int
    inter_t: int
    weights_b: int
    weights_t: int
    act_bytes: int  # bytes per activation element in the run's dtype


def config_sizes(base_config, teacher_config, dtype: str, same_model: bool) -> Sizes:
    """:class:`Sizes` from transformers configs; the weights counted on the meta device (nothing is allocated)."""
    def text(c):
        return c.get_text_config() if hasattr(c, "get_text_config") else c

    def weights(c) -> tuple[int, int]:
        from transformers import AutoModelForCausalLM

        dt = (getattr(c, "dtype", None) or getattr(c, "torch_dtype", None)) if dtype == "auto" else dtype
        dt = getattr(torch, dt) if isinstance(dt, str) else (dt or torch.float32)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(c, dtype=dt)
        return sum(p.numel() for p in model.parameters()) * dt.itemsize, dt.itemsize

    b, t = text(base_config), text(teacher_config)
    w_b, act = weights(base_config)
    w_t = 0 if same_model else weights(teacher_config)[0]
    inter = lambda c: getattr(c, "intermediate_size", None) or 4 * c.hidden_size  # noqa: E731
    return Sizes(b.hidden_size, t.hidden_size, b.num_hidden_layers, t.vocab_size, inter(b), inter(t), w_b, w_t, act)


def light_bytes_per_token(low_width: int, topk: int, kd: bool) -> int:
    """Bytes per token of a light shard: ids, masks, example index, the teacher's top-k (with KD) and the base's
    state at the lowest injection layer (``low_width`` = D_B, 0 without it)."""
    return capture_bytes_per_token([low_width] if low_width else [], [], topk, kd)


def heldout_indices(examples: list[Example], heldout_frac: float) -> set[int]:
    """Every round(1 / heldout_frac)-th example (as `toe extract` holds them out)."""
    every = round(1 / heldout_frac) if heldout_frac > 0 else 0
    return {e.index for e in examples if every and e.index % every == every - 1}


def choose_sample(examples: list[Example], heldout: set[int], tokens: int, seed: int) -> list[int]:
    """Example indices whose full states are kept: every held-out one, then training ones in an order fixed by
    ``seed`` while their tokens fit ``tokens`` (one that does not fit is passed over for a shorter one)."""
    total = sum(len(e.ids) for e in examples if e.index in heldout)
    chosen = set(heldout)
    train = [e for e in examples if e.index not in heldout]
    for i in torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).tolist():
        if total + len(train[i].ids) <= tokens:
            chosen.add(train[i].index)
            total += len(train[i].ids)
    return sorted(chosen)


def shard_groups(examples: list[Example], sample: list[int] | None,
                 shard_size: int) -> list[tuple[list[Example], bool]]:
    """The shards to write, in order: (examples, whether they keep full states). The sampled examples first (in
    data order, ``shard_size`` a shard), then the others; without a sample every shard is full (today's layout)."""
    keep = set(sample) if sample is not None else None
    full = [e for e in examples if keep is None or e.index in keep]
    light = [e for e in examples if keep is not None and e.index not in keep]
    return ([(full[i : i + shard_size], True) for i in range(0, len(full), shard_size)]
            + [(light[i : i + shard_size], False) for i in range(0, len(light), shard_size)])


@dataclass
class Plan:
    """What an extraction will write and hold (bytes), as `toe extract --dry_run` prints it."""

    tokens: int
    examples: int
    heldout_tokens: int
    light_bytes_per_token: int
    full_bytes_per_token: int
    state_examples: list[int] | None  # None: every example keeps its full states
    state_tokens: int
    max_disk: int | None
    light_fields: str = "ids, masks"
    disk: dict[str, int] = field(default_factory=dict)
    ram: dict[str, int] = field(default_factory=dict)

    @property
    def disk_total(self) -> int:
        return sum(self.disk.values())

    @property
    def peak_ram(self) -> int:
        return max(self.ram["capture"], self.ram["build"])

    def to_dict(self) -> dict[str, Any]:
        """The plan as JSON (the summary's ``disk_plan``): the sample as its example count, ``sampled_examples``."""
        d = asdict(self)
        d.pop("state_examples")
        d["sampled_examples"] = len(self.state_examples) if self.state_examples is not None else self.examples
        return {**d, "disk_total": self.disk_total, "peak_ram": self.peak_ram}

    def text(self) -> str:
        share = self.state_tokens / max(self.tokens, 1)
        n_state = len(self.state_examples) if self.state_examples is not None else self.examples
        lines = [
            f"tokens T = {self.tokens} in {self.examples} examples ({self.heldout_tokens} held out, always sampled)",
            f"bytes/token: light {self.light_bytes_per_token} ({self.light_fields}), "
            f"full {self.full_bytes_per_token} (+ base and teacher states at every injection layer)",
            f"state sample S = {self.state_tokens} tokens ({100 * share:.1f} %) in {n_state} examples",
            "disk: " + ", ".join(f"{k} {human(v)}" for k, v in self.disk.items())
            + f"; total {human(self.disk_total)}" + (f" of --max_disk {human(self.max_disk)}" if self.max_disk else ""),
            f"peak RAM (estimate, plus ~{human(PYTHON_RUNTIME)} for Python, torch and transformers): "
            f"{human(self.peak_ram)} = max(capture {human(self.ram['capture'])}, build {human(self.ram['build'])}); "
            + ", ".join(f"{k} {human(v)}" for k, v in self.ram.items() if k not in ("capture", "build")),
        ]
        return "\n".join(lines)


@dataclass(frozen=True)
class Asked:
    """The plan's inputs beyond the data and the models."""

    layers: int  # L injection layers
    topk: int
    kd: bool
    cache_low_states: bool
    heldout_frac: float
    shard_size: int
    batch_size: int
    num_leaves: int
    shape: str
    gate_rank: int
    max_rows: int
    max_disk: int | None = None
    state_tokens: int | None = None
    seed: int = 0
    sample: list[int] | None = None  # a sample fixed beforehand (--reuse_capture: the source's)
    reused: bool = False  # --reuse_capture: no model captures, the shards are read from the source's


def route_bytes_per_row(sizes: Sizes, a: Asked) -> int:
    """Bytes of one clustered token in route_data.safetensors, over every injection layer: its fp16 state (under a
    disk budget, where it sits in the shards instead: two int64), int64 leaf and int8 path branches."""
    budgeted = a.max_disk is not None or a.state_tokens is not None
    return a.layers * ((16 if budgeted else 2 * sizes.d_b) + 8 + tree_depth(a.shape, a.num_leaves))


def fixed_bytes(sizes: Sizes, a: Asked, route_rows: int, n_shards: int, n_examples: int) -> dict[str, int]:
    """The files beside the shards: route data, projector, plug-in, and a reserve for safetensors headers and the
    JSON/markdown records (which list the held-out and sampled examples)."""
    from ..config import ToEConfig
    from ..plugin import shapes_only

    L, d_b, d_t = a.layers, sizes.d_b, sizes.d_t  # noqa: N806
    plugin = shapes_only(ToEConfig(hidden_size=d_b, layers=list(range(L)), num_leaves=a.num_leaves, shape=a.shape,
                                   gate_rank=a.gate_rank, top_k=1))  # the tensors by shape alone
    plugin_bytes = sum(t.numel() * t.element_size() for t in plugin.state_dict().values())
    return {
        "route_data": route_rows * route_bytes_per_row(sizes, a),
        "projector": L * 4 * ((d_t + 1) * d_b + d_t * d_b + 2 * d_b),
        "plugin": plugin_bytes,
        "headers_and_records": 32_768 + L * (4096 + 16 * a.num_leaves) + 24 * n_examples
        + n_shards * (160 * (10 + 2 * L) + 8 * a.shard_size),
    }


def plan_extraction(examples: list[Example], sizes: Sizes, a: Asked) -> Plan:
    """The sample, the disk and the peak RAM of an extraction; refuses, in one line naming what would fit, a
    ``max_disk`` that the light fields and the held-out examples' states alone exceed."""
    kd_k = a.topk if a.kd else 0
    full = capture_bytes_per_token([sizes.d_b] * a.layers, [sizes.d_t] * a.layers, kd_k, a.kd)
    light = light_bytes_per_token(sizes.d_b if a.cache_low_states else 0, kd_k, a.kd)
    heldout = heldout_indices(examples, a.heldout_frac)
    lengths = {e.index: len(e.ids) for e in examples}
    usable = {e.index: int((e.align[1:] >= 0).sum()) for e in examples}  # valid rows: aligned, not the first
    T, H = sum(lengths.values()), sum(lengths[i] for i in heldout)  # noqa: N806
    route_per_token = route_bytes_per_row(sizes, a)
    n_shards = math.ceil(len(examples) / a.shard_size) + 1

    def fixed_without_route(n: int) -> int:
        return sum(v for k, v in fixed_bytes(sizes, a, 0, n_shards, n).items())

    budget_tokens = a.state_tokens if a.state_tokens is not None else T
    if a.max_disk is not None:
        # what is left for the training examples' states (and their route rows) once every token's light fields,
        # the held-out examples' states and the files beside the shards are counted; a tree needs N rows at least
        room = a.max_disk - T * light - fixed_without_route(len(examples)) - H * (full - light)
        if room < a.num_leaves * (full - light + route_per_token):
            raise ToEError(refusal(examples, heldout, sizes, a, full, light, fixed_without_route))
        s = room // (full - light + route_per_token)  # training tokens with states, each a route row at most
        if s > a.max_rows:  # the route data stops growing at max_rows: more room for states
            s = (room - a.max_rows * route_per_token) // (full - light)
        budget_tokens = min(budget_tokens, H + s)
    if a.sample is not None:
        sample: list[int] | None = a.sample
    elif budget_tokens >= T:
        sample = None
    else:
        if budget_tokens < H:
            raise ToEError(f"--state_tokens {budget_tokens} is below the {H} tokens of the held-out examples, whose "
                           "states are always kept: raise it, or lower --heldout_frac")
        sample = choose_sample(examples, heldout, budget_tokens, a.seed)
        if len(sample) == len(examples):
            sample = None
    chosen = set(sample) if sample is not None else set(lengths)
    S = sum(lengths[i] for i in chosen)  # noqa: N806
    route_rows = min(a.max_rows, sum(usable[i] for i in chosen if i not in heldout))
    disk = {"shards": T * light + S * (full - light),
            **fixed_bytes(sizes, a, route_rows, n_shards, len(examples))}
    t_max = max(lengths.values(), default=0)
    mean_len = T / max(len(examples), 1)
    L, d_b, d_t = a.layers, sizes.d_b, sizes.d_t  # noqa: N806
    # capture: one batch's forward (a decoder layer's transient, the captured states, the teacher's logits with
    # their log-softmax and top-k) and the shard's columns twice (the lists, then their concatenation)
    capture_act = a.batch_size * t_max * (sizes.act_bytes * (2 * max(sizes.inter_b, sizes.inter_t) + 4 * max(d_b, d_t))
                                          + 4 * L * (d_b + d_t) + (3 * 4 * sizes.vocab if a.kd else 0))
    capture_shard = int(2 * a.shard_size * mean_len * full)
    if a.reused:  # the base alone loads (for the build) and no forward runs: each shard is read and written
        capture_act = 0
    ram = {"weights": sizes.weights_b + (0 if a.reused else sizes.weights_t), "capture_batch": capture_act,
           "capture_shard": capture_shard}
    ram["capture"] = ram["weights"] + capture_act + capture_shard
    # build (the teacher freed): the largest of the Gram matrices (train + held-out accumulators and eigh's copy,
    # float64), the fusion maps' training (a step's examples as read from their shards, its activations, the maps
    # with their gradients and Adam moments), and the clustering (per layer δ fp32, h fp16, where and the pick's
    # order of the R clustered rows, their float copies, a distance block, two shards at a shard's turn in the
    # second pass and a flag per token: rows.py); beyond R = min(max_rows, its training tokens) only the flags grow
    # with the data. A step's
    # activations: what each decoder layer saves for the backward (~5 D + 3 I values a token, counted with
    # autograd's saved-tensor hooks on Qwen2; 8 D here, for wider KV heads), and the loss's peak over the vocabulary
    # in the backward (the logits, their log-softmax and both gradients: ~3 V fp32 values a token by the peak RSS of
    # a wide-vocabulary step; 4 here): runs/fusion_memory.py
    gram = L * 2 * ((d_t + 1) ** 2 + (d_t + 1) * d_b) * 8 + 2 * (d_t + 1) ** 2 * 8
    fusion = (FUSION_BATCH * t_max * (full + sizes.act_bytes * sizes.layers_b * (8 * d_b + 3 * sizes.inter_b)
                                      + 4 * 4 * sizes.vocab)  # the loss upcasts the logits to fp32
              + 4 * 4 * L * (d_t * d_b + 2 * d_b))
    r = min(a.max_rows, sum(usable[i] for i in chosen if i not in heldout))
    cluster = (L * r * (6 * d_b + 32) + 3 * r * 4 * d_b + min(DISTANCE_CHUNK, r) * a.num_leaves * 4
               + int(2 * a.shard_size * mean_len * full) + T)
    ram.update(gram=gram, fusion_training=fusion, clustering=cluster)
    ram["build"] = sizes.weights_b + max(gram, fusion, cluster)
    fields = ", ".join(["ids, masks", *(["top-k"] if a.kd else []), *(["low state"] if a.cache_low_states else [])])
    return Plan(T, len(examples), H, light, full, sample, S, a.max_disk, fields, disk, ram)


def disk_plan(examples: list[Example], teacher: str, base: str, capture: Capture, fusion: Fusion, tree: Tree,
              disk: Disk, dtype: str, kd: bool, batch_size: int, seed: int, layers: int,
              sample: list[int] | None, reused: bool = False) -> Plan:
    """`toe extract`'s plan from the models' configs alone: no weights load. ``layers``: how many injection layers;
    ``sample``: a sample fixed beforehand (the source's, under --reuse_capture); ``reused``: the shards come from
    another extraction's (--reuse_capture: no model captures)."""
    t_kw, b_kw = capture.model_kwargs()
    same_model = teacher == base and t_kw == b_kw
    sizes = config_sizes(load_config(base, **b_kw), load_config(teacher, "teacher", **t_kw), dtype, same_model)
    return plan_extraction(examples, sizes, Asked(
        layers=layers, topk=capture.topk_logprobs, kd=kd, cache_low_states=disk.cache_low_states,
        heldout_frac=fusion.heldout_frac, shard_size=capture.shard_size, batch_size=batch_size,
        num_leaves=tree.num_leaves, shape=tree.shape, gate_rank=tree.gate_rank, max_rows=tree.max_rows,
        max_disk=disk.budget(), state_tokens=disk.state_tokens, seed=seed, sample=sample, reused=reused))


def refusal(examples: list[Example], heldout: set[int], sizes: Sizes, a: Asked, full: int, light: int,
            fixed) -> str:
    """The one line refusing a --max_disk the light fields and the held-out states exceed, naming what fits."""
    T = sum(len(e.ids) for e in examples)  # noqa: N806
    H = sum(len(e.ids) for e in examples if e.index in heldout)  # noqa: N806
    need = (T * light + H * (full - light) + fixed(len(examples))
            + a.num_leaves * (full - light + route_bytes_per_row(sizes, a)))
    # the most leading rows (--limit) whose light fields, held-out states and N training tokens' states fit: the
    # same sum as `need`, over a prefix (the files beside the shards grow by 24 B a row)
    rows, total = 0, fixed(0) + a.num_leaves * (full - light + route_bytes_per_row(sizes, a))
    for e in examples:
        total += len(e.ids) * (full if e.index in heldout else light) + 24
        if total > a.max_disk:
            break
        rows += 1
    hints = [f"--limit {rows}" if rows else "far fewer rows"]
    kd_k = a.topk if a.kd else 0
    if kd_k:
        hints.append(f"--topk_logprobs 0 (saves {human(T * (4 + 6 * kd_k))})")
    if a.cache_low_states:
        hints.append(f"--cache_low_states false (saves {human(T * 2 * sizes.d_b)})")
    if H:
        hints.append(f"a lower --heldout_frac (the held-out examples' states take {human(H * (full - light))})")
    return (f"--max_disk {human(a.max_disk)} is below what the extraction needs at least: {human(need)} (every "
            f"token's light fields, {T} x {light} B, the held-out examples' states and N = {a.num_leaves} training "
            f"tokens' to build a tree from); give at least {human(need)}, or " + ", or ".join(hints))


# -- memory: the tree build -----------------------------------------------------------------------------------------
def tree_build_bytes(num_leaves: int, shape: str, rows: int) -> int:
    """Bytes the largest tensors of building an N-leaf tree from ``rows`` clustered tokens take beyond the rows
    themselves: the (N, depth) path tables, the routing check's chunk of dense leaf log-probabilities (2^25 numbers,
    a few copies), and for a deep tree k-means' (chunk, N) distances. The gate's initialisation reads one step of
    every path at a time (rows × r), never a (rows, M) table."""
    n, depth = num_leaves, tree_depth(shape, num_leaves)
    total = 2 * 8 * n * depth + 3 * 4 * 2**25
    if shape == "deep":
        total += 4 * min(rows, 65536) * n
    return total


def physical_memory() -> int | None:
    """Bytes of RAM on this machine (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_leaves_fit(num_leaves: int, shape: str, rows: int, memory: int | None = None) -> None:
    """Refuses N leaves that the clustered tokens cannot fill, or that do not fit in memory, with the numbers.

    Args:
        rows: tokens that will be clustered (after --sample_rate and --max_rows).
        memory: bytes available (default: the machine's RAM).
    """
    if rows < num_leaves:
        raise ToEError(f"num_leaves={num_leaves} but only about {rows} tokens are available to cluster: use more "
                       "data (--limit), a higher --sample_rate or --max_rows, or fewer --num_leaves")
    memory = physical_memory() if memory is None else memory
    need = tree_build_bytes(num_leaves, shape, rows)
    if memory and need > memory // 2:
        raise ToEError(f"num_leaves={num_leaves} on {rows} tokens needs about {need / 2**30:.1f} GiB to build the "
                       f"tree, more than half of this machine's {memory / 2**30:.1f} GiB: use fewer --num_leaves or a "
                       "lower --max_rows")
