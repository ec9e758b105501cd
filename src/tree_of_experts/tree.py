"""The tree gate: routes a base hidden state to a few leaves of a binary tree.

Axis vocabulary: B batch, T tokens, D hidden, N leaves, M internal nodes (= N - 1), K selected leaves, r gate rank.

Two tree shapes share one parameterisation (one logit per internal node, ``sigmoid(s_m)`` = probability of the
node's "1" branch):

* ``balanced`` (ToE-B): a complete tree of depth ``log2 N`` stored as a heap (root 0, children ``2m+1`` / ``2m+2``).
  Branch 1 is the right child. Leaf ``i`` is reached by the bits of ``i``, most significant first.
* ``deep`` (ToE-D): a caterpillar. Node ``j`` decides "take leaf j" (branch 1) or "go deeper" (branch 0); the last
  leaf is reached by going deeper at every node. Leaf probabilities are a stick-breaking process, so the number of
  leaves that carry the mass (and hence adaptive top-p's K) follows the gate's confidence.
* ``flat``: no tree, a softmax over N leaf logits — the flat-router ("MoE") baseline over the same bank. Its
  "nodes" are the N leaves and its path labels are one-vs-rest.

This module imports only torch.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

SHAPES = ("balanced", "deep", "flat")
SELECTIONS = ("dense", "topk", "topp", "beam")


class RouteOutput(NamedTuple):
    """Everything a routing call computed. Aux losses are pure functions of this (see :func:`usage`).

    Attributes:
        indices: (B, T, K) selected leaf ids (int64). Padding slots of adaptive selection hold leaf 0 with weight 0.
        weights: (B, T, K) float32 mixing weights; they sum to 1 over the K axis.
        leaf_logp: (B, T, N) float32 log-probabilities of every leaf, or None in beam mode (never materialised).
        node_logits: (B, T, M) float32 node logits, or None in beam mode.
        intensity: (B, T, 1) float32 null/intensity gate a_t in (0, 1), or None when the gate has none.
        num_selected: (B, T) int64 number of leaves with non-zero weight (adaptive for top-p).
    """

    indices: torch.Tensor
    weights: torch.Tensor
    leaf_logp: torch.Tensor | None
    node_logits: torch.Tensor | None
    intensity: torch.Tensor | None
    num_selected: torch.Tensor


def check_tree(shape: str, num_leaves: int) -> None:
    """Raises ValueError with the fix if ``num_leaves`` is not valid for ``shape``."""
    if shape not in SHAPES:
        raise ValueError(f"tree shape {shape!r} is unknown: use one of {SHAPES}")
    if num_leaves < 2:
        raise ValueError(f"num_leaves={num_leaves}: a tree needs at least 2 leaves")
    if shape == "balanced" and num_leaves & (num_leaves - 1):
        lo = 1 << (num_leaves.bit_length() - 1)
        raise ValueError(
            f"num_leaves={num_leaves}: a balanced tree needs a power of two (use {lo} or {2 * lo}, or shape='deep')"
        )


def tree_depth(shape: str, num_leaves: int) -> int:
    """Number of decisions on the longest root-to-leaf path."""
    if shape == "flat":
        return 1
    return int(math.log2(num_leaves)) if shape == "balanced" else num_leaves - 1


def num_nodes(shape: str, num_leaves: int) -> int:
    """M: logits per token (internal nodes of a tree; the N leaves themselves for a flat router)."""
    return num_leaves if shape == "flat" else num_leaves - 1


def path_table(shape: str, num_leaves: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Root-to-leaf paths as flat tables.

    Returns:
        nodes: (N, P) int64 node index visited at each step (-1 past the end of a short path), P = max path length.
        branches: (N, P) int64 branch taken there (1 or 0; -1 past the end).
    """
    check_tree(shape, num_leaves)
    depth = tree_depth(shape, num_leaves)
    if shape == "balanced":  # leaf i takes the bits of i, most significant first; vectorised (N = 2^20 is 20M steps)
        leaf = torch.arange(num_leaves)[:, None]  # (N, 1)
        branches = (leaf >> torch.arange(depth - 1, -1, -1)) & 1  # (N, depth)
        prefix = leaf >> torch.arange(depth, 0, -1)  # (N, depth) the bits above each level: the node's rank there
        return (1 << torch.arange(depth)) - 1 + prefix, branches
    nodes = torch.full((num_leaves, depth), -1, dtype=torch.long)
    branches = torch.full((num_leaves, depth), -1, dtype=torch.long)
    for leaf in range(num_leaves):
        if shape == "flat":
            nodes[leaf, 0], branches[leaf, 0] = leaf, 1
        else:
            steps = min(leaf + 1, depth)
            nodes[leaf, :steps] = torch.arange(steps)
            branches[leaf, :steps] = 0
            if leaf < depth:
                branches[leaf, leaf] = 1
    return nodes, branches


def path_labels(shape: str, num_leaves: int, leaf_ids: torch.Tensor) -> torch.Tensor:
    """Per-node supervision for routing towards ``leaf_ids``.

    Args:
        leaf_ids: (...) int64 target leaves.

    Returns:
        (..., M) float32 with 1/0 for the branch to take at nodes on the path and -1 at nodes off it (flat: 1 at
        the leaf, 0 elsewhere).
    """
    nodes, branches = path_table(shape, num_leaves)
    ids = leaf_ids.reshape(-1).cpu()
    # Flat routers score every leaf for every token (one-vs-rest); trees only score the nodes on the path. Only the
    # rows asked for are built: an (N, M) table of every leaf would be N² numbers (16 GB at N = 2^16).
    labels = torch.full((len(ids), num_nodes(shape, num_leaves)), 0.0 if shape == "flat" else -1.0)
    on_path, branch = nodes[ids], branches[ids]  # (R, P)
    rows = torch.arange(len(ids))[:, None].expand_as(on_path)
    on = on_path >= 0
    labels[rows[on], on_path[on]] = branch[on].float()
    return labels.reshape(*leaf_ids.shape, -1).to(leaf_ids.device)


def leaf_log_probs(shape: str, node_logits: torch.Tensor,
                   paths: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Log-probability of every leaf from node logits, vectorised over tokens.

    Args:
        node_logits: (..., M) float32.
        paths: balanced only: the (node ids, ±1 signs) table of :func:`path_gather_table`, if the caller holds
            it (TreeGate keeps it as buffers on its device); computed and cached otherwise.

    Returns:
        (..., N) float32 (N = M + 1 for trees, N = M for flat); ``exp`` sums to 1 over the last axis.
    """
    if shape == "flat":
        return torch.log_softmax(node_logits, dim=-1)
    if shape == "deep":
        go1, go0 = F.logsigmoid(node_logits), F.logsigmoid(-node_logits)
        # Stick breaking: leaf j = (continue at 0..j-1) then take at j; the last leaf continues everywhere.
        cont = torch.cumsum(go0, dim=-1)  # (..., M)
        before = F.pad(cont[..., :-1], (1, 0))  # (..., M) log-prob of reaching node j
        return torch.cat([before + go1, cont[..., -1:]], dim=-1)
    # Balanced: every leaf sums log sigmoid(±s) over the log2 N nodes on its path, read through a cached (N, depth)
    # table in one gather; log sigmoid(-s) for branch 0. A few ops whatever the depth (decode-time dispatch cost),
    # N log2 N numbers per token (small next to the base's vocabulary logits when training).
    nodes, signs = paths if paths is not None else _cached_table(node_logits.shape[-1] + 1, node_logits.device)
    return F.logsigmoid(node_logits[..., nodes] * signs).sum(-1)


def path_gather_table(num_leaves: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, depth) node ids and ±1 branch signs (+1 = branch 1) along each leaf's path in a balanced tree."""
    nodes, branches = path_table("balanced", num_leaves)
    return nodes, 2.0 * branches - 1.0


@functools.lru_cache(maxsize=64)
def _cached_table(num_leaves: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    nodes, signs = path_gather_table(num_leaves)
    return nodes.to(device), signs.to(device)


class RMSNorm(nn.Module):
    """Root-mean-square norm, always in float32 (the gate must not depend on the base's dtype)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), self.weight.shape, self.weight, self.eps)


class TreeGate(nn.Module):
    """z = act(W_trunk RMSNorm(h)); node logits s = W_node z + b; leaves by path products.

    Args:
        hidden_size: D, the base's hidden size at the injection layer.
        num_leaves: N.
        shape: "balanced", "deep" or "flat" (the softmax-router baseline).
        rank: r, width of the shared trunk.
        selection: "dense", "topk", "topp" or "beam" (balanced only: routing cost grows with log N).
        top_k: K for "topk" and the beam width for "beam"; the cap on K for "topp".
        top_p: probability mass kept by "topp".
        intensity: also learn a null/intensity gate a_t = sigmoid(w z + c) (initialised open, c = 4).
        query_norm: z = LayerNorm(act(W_trunk RMSNorm(h))) without affine: the query the node hyperplanes read has a
            fixed scale whatever the trunk learns (memory layers normalise their queries for the same reason).
    """

    def __init__(
        self,
        hidden_size: int,
        num_leaves: int,
        shape: str = "balanced",
        rank: int = 64,
        selection: str = "topk",
        top_k: int = 4,
        top_p: float = 0.9,
        intensity: bool = False,
        query_norm: bool = False,
    ):
        super().__init__()
        check_tree(shape, num_leaves)
        if selection not in SELECTIONS:
            raise ValueError(f"selection {selection!r} is unknown: use one of {SELECTIONS}")
        if selection == "beam" and shape != "balanced":
            raise ValueError("selection='beam' descends level by level and needs shape='balanced'; use 'topp' for deep")
        self.shape, self.num_leaves, self.selection = shape, num_leaves, selection
        self.top_k, self.top_p = min(top_k, num_leaves), top_p
        self.query_norm = query_norm
        self.norm = RMSNorm(hidden_size)
        self.trunk = nn.Linear(hidden_size, rank)
        self.nodes = nn.Linear(rank, num_nodes(shape, num_leaves))
        self.intensity = nn.Linear(rank, 1) if intensity else None
        # leaf paths for leaf_log_probs, moved with the module, not saved; a beam gate never reads them (a per-call
        # override of its selection reads the cached table), and they are N log2 N numbers (250 MB at N = 2^20).
        # Index tables: made on the CPU even when the module is built on the meta device (ToEPlugin.load).
        if shape == "balanced" and selection != "beam":
            with torch.device("cpu"):
                nodes, signs = path_gather_table(num_leaves)
            self.register_buffer("path_nodes", nodes, persistent=False)
            self.register_buffer("path_signs", signs, persistent=False)
        nn.init.normal_(self.nodes.weight, std=rank**-0.5)
        nn.init.zeros_(self.nodes.bias)
        if self.intensity is not None:
            nn.init.zeros_(self.intensity.weight)
            nn.init.constant_(self.intensity.bias, 4.0)

    @property
    def num_nodes(self) -> int:
        return num_nodes(self.shape, self.num_leaves)

    def features(self, h: torch.Tensor) -> torch.Tensor:
        """(B, T, D) any dtype -> (B, T, r) float32 trunk features."""
        z = F.silu(self.trunk(self.norm(h)))
        return F.layer_norm(z, z.shape[-1:]) if self.query_norm else z

    def forward(self, h: torch.Tensor, selection: str | None = None) -> RouteOutput:
        """Routes every token of ``h`` (B, T, D). ``selection`` overrides the configured mode for this call."""
        with torch.autocast(h.device.type, enabled=False):
            z = self.features(h)  # (B, T, r)
            a = torch.sigmoid(self.intensity(z)) if self.intensity is not None else None
            mode = selection or self.selection
            if mode == "beam":
                indices, logp = self.beam(z)
                return RouteOutput(indices, torch.softmax(logp, -1), None, None, a, _count(indices))
            logits = self.nodes(z)  # (B, T, M)
            paths = (self.path_nodes, self.path_signs) if hasattr(self, "path_nodes") else None
            leaf_logp = leaf_log_probs(self.shape, logits, paths)  # (B, T, N)
            indices, weights = select(leaf_logp, mode, self.top_k, self.top_p)
            return RouteOutput(indices, weights, leaf_logp, logits, a, (weights > 0).sum(-1))

    def beam(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Beam descent of width K over the levels of a balanced tree.

        Only the node logits on the beam are computed, so the cost per token is O(K r log N) whatever N is. With
        K >= N it returns exactly the top-K leaves of :func:`leaf_log_probs`.

        Args:
            z: (B, T, r) float32 trunk features.

        Returns:
            indices: (B, T, K') leaf ids, K' = min(K, N), sorted by log-probability (descending).
            logp: (B, T, K') their log-probabilities.
        """
        depth = tree_depth("balanced", self.num_leaves)
        node = torch.zeros(*z.shape[:-1], 1, dtype=torch.long, device=z.device)  # (B, T, beam) heap ids
        logp = z.new_zeros(*z.shape[:-1], 1)
        for _ in range(depth):
            w = self.nodes.weight[node]  # (B, T, beam, r)
            s = torch.einsum("btkr,btr->btk", w, z) + self.nodes.bias[node]  # (B, T, beam)
            right = logp + F.logsigmoid(s)  # log sigmoid(-s) = log sigmoid(s) - s: one transcendental per level
            logp = torch.stack([right - s, right], -1).flatten(-2)  # (B, T, 2 beam)
            node = torch.stack([2 * node + 1, 2 * node + 2], -1).flatten(-2)
            if node.shape[-1] > self.top_k:
                logp, keep = logp.topk(self.top_k, dim=-1)
                node = node.gather(-1, keep)
        logp, order = logp.sort(dim=-1, descending=True)
        return node.gather(-1, order) - self.num_nodes, logp


def select(leaf_logp: torch.Tensor, mode: str, top_k: int, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Picks leaves and renormalised mixing weights without host synchronisation.

    Args:
        leaf_logp: (B, T, N) float32.
        mode: "dense", "topk" or "topp".

    Returns:
        indices (B, T, K), weights (B, T, K). For "topp", K = top_k and slots beyond the adaptive count get weight 0.
    """
    if mode == "dense":
        n = leaf_logp.shape[-1]
        idx = torch.arange(n, device=leaf_logp.device).expand(leaf_logp.shape)
        return idx, leaf_logp.exp()
    logp, idx = leaf_logp.topk(top_k, dim=-1)  # (B, T, K) sorted descending
    if mode == "topk":
        return idx, torch.softmax(logp, -1)
    if mode != "topp":
        raise ValueError(f"selection {mode!r} is unknown: use one of {SELECTIONS}")
    p = logp.exp()
    mass_before = torch.cumsum(p, -1) - p  # keep a leaf while the mass before it is still short of top_p
    keep = mass_before < top_p  # the first leaf is always kept
    p = p * keep
    return idx, p / p.sum(-1, keepdim=True)


def usage(route: RouteOutput, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean routing probability per leaf over the (masked) tokens, (N,). Needs a dense route (leaf_logp)."""
    if route.leaf_logp is None:
        raise ValueError("usage needs leaf_logp: route with selection other than 'beam'")
    p = route.leaf_logp.exp()  # (B, T, N)
    if mask is None:
        return p.flatten(0, -2).mean(0)
    m = mask.to(p.dtype)[..., None]
    return (p * m).flatten(0, -2).sum(0) / m.sum().clamp_min(1.0)


def selection_mass(route: RouteOutput, num_leaves: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mixing weight each leaf received, summed over the (masked) tokens, (N,): the leaf usage of the *selected*
    experts, for every selection mode (beam included, which has no dense leaf_logp)."""
    w = route.weights.float()  # (B, T, K)
    if mask is not None:
        w = w * mask.to(w.dtype)[..., None]
    return torch.zeros(num_leaves, device=w.device).index_add_(0, route.indices.flatten(), w.flatten())


def effective_leaves(leaf_usage: torch.Tensor) -> torch.Tensor:
    """exp(entropy of usage): N when leaves are used evenly, 1 when all tokens go to one leaf."""
    p = leaf_usage / leaf_usage.sum()
    return torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum())


def usage_loss(route: RouteOutput, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Regulariser against leaf collapse: log N - entropy(usage), zero when usage is uniform."""
    u = usage(route, mask)
    return math.log(u.numel()) - torch.log(effective_leaves(u))


def route_loss(
    route: RouteOutput, labels: torch.Tensor, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Binary cross-entropy of node decisions against path labels (from :func:`path_labels`).

    Args:
        labels: (B, T, M) with 1/0 on the path and -1 off it.
        mask: (B, T) tokens that count.

    Returns:
        loss (scalar) and per-node accuracy (M,) over the tokens whose path visits the node (NaN where none do).
    """
    if route.node_logits is None:
        raise ValueError("route_loss needs node logits: route with selection other than 'beam'")
    on = labels >= 0
    if mask is not None:
        on = on & mask.bool()[..., None]
    target = labels.clamp_min(0)
    bce = F.binary_cross_entropy_with_logits(route.node_logits, target, reduction="none")
    loss = (bce * on).sum() / on.sum().clamp_min(1)
    correct = ((route.node_logits > 0).float() == target) & on
    acc = correct.flatten(0, -2).sum(0) / on.flatten(0, -2).sum(0)  # (M,) NaN where no token visits
    return loss, acc


def _count(indices: torch.Tensor) -> torch.Tensor:
    return torch.full(indices.shape[:-1], indices.shape[-1], dtype=torch.long, device=indices.device)
