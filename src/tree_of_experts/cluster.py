"""Building the tree: clustering expert signals into leaves, and a gate initialised from the geometry."""

from __future__ import annotations

import torch

from .tree import TreeGate, path_labels


def kmeans(x: torch.Tensor, k: int, iters: int = 25, seed: int = 0, n_init: int = 3, chunk: int = 65536) -> torch.Tensor:
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
    inertia = sum(float(((x[i : i + chunk] - centers[labels[i : i + chunk]]) ** 2).sum()) for i in range(0, len(x), chunk))
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


@torch.no_grad()
def init_gate_from_geometry(gate: TreeGate, states: torch.Tensor, leaf: torch.Tensor, sharpness: float = 4.0) -> None:
    """Sets the gate so it routes base states roughly like the clustering did.

    The trunk becomes ±(top r/2 principal directions) of the normalised states, so SiLU(z) keeps the sign
    information of both halves; each node's hyperplane is the perpendicular bisector, in trunk space, of the mean
    features of the tokens in its "1" and "0" subtrees, scaled so the logits have standard deviation ``sharpness``.

    Args:
        states: (R, D) base states at the injection layer.
        leaf: (R,) leaf id of each row.
    """
    x = gate.norm(states.float())
    mean = x.mean(0)
    half = max(1, gate.trunk.out_features // 2)
    _, s, v = torch.linalg.svd(x - mean, full_matrices=False)
    k = min(half, v.shape[0])
    p = v[:k] / (s[:k, None] / (len(x) ** 0.5)).clamp_min(1e-6)  # (k, D) whitened principal directions
    w = torch.zeros_like(gate.trunk.weight)
    w[:k], w[half : half + k] = p, -p
    gate.trunk.weight.copy_(w)
    gate.trunk.bias.copy_(-(w @ mean))
    z = gate.features(states)  # (R, r)
    labels = path_labels(gate.shape, gate.num_leaves, leaf)  # (R, M)
    for m in range(gate.num_nodes):
        ones, zeros = labels[:, m] == 1, labels[:, m] == 0
        if not ones.any() or not zeros.any():
            gate.nodes.weight[m].zero_()
            gate.nodes.bias[m] = 4.0 if ones.any() else -4.0
            continue
        mu1, mu0 = z[ones].mean(0), z[zeros].mean(0)
        direction = mu1 - mu0
        logit = (z[ones | zeros] - (mu1 + mu0) / 2) @ direction
        scale = sharpness / logit.std().clamp_min(1e-6)
        gate.nodes.weight[m] = direction * scale
        gate.nodes.bias[m] = -((mu1 + mu0) / 2 @ direction) * scale
