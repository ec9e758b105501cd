"""The tree gate's starting point from the clustering: node hyperplanes that route the base's states roughly as the
clustering grouped them, computed one step of every path at a time (never an (R, M) table of every node: R × M
numbers, 17 GB at 65k rows and leaves), and the check of how well they route (dense, in chunks of rows)."""

from __future__ import annotations

import torch

from ..tree import TreeGate, path_table


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
    mu1, mu0, n1, n0 = branch_means(gate, z, leaf)
    direction, mid = mu1 - mu0, (mu1 + mu0) / 2  # (M, r)
    # the std of each node's logit over the rows that reach it (on its path; every row for a flat router)
    s1, s2, n = (torch.zeros(gate.num_nodes) for _ in range(3))
    for node, _, rows in node_visits(gate, leaf):
        logit = ((z[rows] - mid[node]) * direction[node]).sum(-1)
        s1.index_add_(0, node, logit), s2.index_add_(0, node, logit**2), n.index_add_(0, node, torch.ones_like(logit))
    std = ((s2 - s1**2 / n.clamp_min(1)) / (n - 1).clamp_min(1)).clamp_min(0).sqrt()  # unbiased, as Tensor.std
    scale = sharpness / std.clamp_min(1e-6)
    split = (n1 > 0) & (n0 > 0)  # a node whose rows all take one branch: a fixed logit of ±4 towards it
    gate.nodes.weight.copy_(torch.where(split[:, None], direction * scale[:, None], torch.zeros_like(direction)))
    gate.nodes.bias.copy_(torch.where(split, -(mid * direction).sum(-1) * scale,
                                      torch.where(n1 > 0, 4.0, -4.0)))


def node_visits(gate: TreeGate, leaf: torch.Tensor):
    """For each step along the paths, (node id, branch taken, row ids) of the rows whose path has that step: R rows
    a step, never an (R, M) table of every node (R × M numbers: 17 GB at 65k rows and leaves). A flat router's
    node m is visited by every row (branch 1 for the rows of leaf m, 0 for the others)."""
    rows = torch.arange(len(leaf))
    if gate.shape == "flat":
        for m in range(gate.num_nodes):
            yield torch.full_like(rows, m), (leaf == m).long(), rows
        return
    nodes, branches = path_table(gate.shape, gate.num_leaves)
    for step in range(nodes.shape[1]):
        node, branch = nodes[leaf, step], branches[leaf, step]
        on = node >= 0
        yield node[on], branch[on], rows[on]


def branch_means(gate: TreeGate, z: torch.Tensor, leaf: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per node, the mean trunk features of the rows that take its branch 1 and branch 0, and their counts."""
    m, r = gate.num_nodes, z.shape[1]
    sums, counts = torch.zeros(2, m, r), torch.zeros(2, m)
    for node, branch, rows in node_visits(gate, leaf):
        slot = branch * m + node  # (branch, node) flattened
        sums.view(2 * m, r).index_add_(0, slot, z[rows])
        counts.view(2 * m).index_add_(0, slot, torch.ones(len(rows)))
    means = sums / counts.clamp_min(1)[..., None]
    return means[1], means[0], counts[1], counts[0]


@torch.no_grad()
def dense_argmax(gate: TreeGate, x: torch.Tensor, budget: int = 2**25) -> torch.Tensor:
    """(R,) the most likely leaf of each row, in chunks of rows: a dense routing of every row at once is R × N ×
    depth numbers (25 GB at 200k rows and 1024 leaves)."""
    depth = max(1, gate.num_leaves.bit_length())
    chunk = max(1, budget // (gate.num_leaves * depth))
    return torch.cat([gate(x[i:i + chunk], "dense").leaf_logp.argmax(-1) for i in range(0, len(x), chunk)])
