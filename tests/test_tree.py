from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tree_of_experts.tree import (
    TreeGate,
    effective_leaves,
    leaf_log_probs,
    path_labels,
    path_table,
    route_loss,
    select,
    selection_mass,
    usage,
)


def brute_force(shape: str, logits: torch.Tensor) -> torch.Tensor:
    """Leaf probabilities as explicit products of sigmoids along each path, one leaf at a time."""
    n = logits.shape[-1] + 1
    nodes, branches = path_table(shape, n)
    out = torch.ones(*logits.shape[:-1], n, dtype=torch.float64)
    for leaf in range(n):
        for node, branch in zip(nodes[leaf].tolist(), branches[leaf].tolist()):
            if node < 0:
                break
            p1 = torch.sigmoid(logits[..., node].double())
            out[..., leaf] *= p1 if branch == 1 else 1 - p1
    return out


@pytest.mark.parametrize("shape,n", [("balanced", 2), ("balanced", 8), ("balanced", 64), ("deep", 2), ("deep", 7), ("deep", 33)])
def test_leaf_probs_sum_to_one_and_match_path_products(shape, n):
    logits = torch.randn(3, 5, n - 1) * 3
    logp = leaf_log_probs(shape, logits)
    assert logp.shape == (3, 5, n)
    torch.testing.assert_close(logp.exp().sum(-1), torch.ones(3, 5))
    torch.testing.assert_close(logp.exp().double(), brute_force(shape, logits), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape,n", [("balanced", 16), ("deep", 9), ("flat", 7)])
def test_path_labels_descend_to_their_leaf(shape, n):
    leaves = torch.arange(n)
    labels = path_labels(shape, n, leaves)  # (N, M)
    # Logits that follow the labels with certainty must put all mass on the labelled leaf.
    logits = torch.where(labels == 1, 50.0, torch.where(labels == 0, -50.0, 0.0))
    assert torch.equal(leaf_log_probs(shape, logits).argmax(-1), leaves)


def test_flat_router_is_a_softmax_over_leaves():
    logits = torch.randn(2, 3, 6)
    torch.testing.assert_close(leaf_log_probs("flat", logits), torch.log_softmax(logits, -1))
    assert TreeGate(8, 6, "flat", rank=4).nodes.out_features == 6


def test_beam_with_wide_beam_equals_exact_topk():
    torch.manual_seed(0)
    gate = TreeGate(16, 32, "balanced", rank=8, selection="beam", top_k=32)
    h = torch.randn(2, 6, 16)
    route = gate(h)
    exact = gate(h, selection="dense").leaf_logp.topk(32, dim=-1)
    assert torch.equal(route.indices, exact.indices)
    torch.testing.assert_close(route.weights, torch.softmax(exact.values, -1))


def test_narrow_beam_finds_the_best_leaf_when_paths_are_confident():
    torch.manual_seed(0)
    gate = TreeGate(16, 1024, "balanced", rank=8, selection="beam", top_k=4)
    with torch.no_grad():
        gate.nodes.weight.mul_(50)  # confident node decisions: greedy descent finds the argmax leaf
    h = torch.randn(4, 3, 16)
    beam = gate(h).indices[..., 0]
    exact = gate(h, selection="dense").leaf_logp.argmax(-1)
    assert (beam == exact).float().mean() > 0.9


def test_topk_weights_renormalised():
    logp = torch.log_softmax(torch.randn(2, 3, 8), -1)
    idx, w = select(logp, "topk", 3, 0.9)
    assert idx.shape == (2, 3, 3)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 3))
    torch.testing.assert_close(w, torch.softmax(logp.gather(-1, idx), -1))


def test_topp_selects_an_adaptive_number_of_leaves():
    peaked = torch.log(torch.tensor([0.95, 0.01, 0.01, 0.01, 0.01, 0.01]))
    flat = torch.log(torch.full((6,), 1 / 6))
    idx, w = select(torch.stack([peaked, flat])[None], "topp", 6, 0.9)
    counts = (w > 0).sum(-1)[0]
    assert counts.tolist() == [1, 6]  # 0.95 >= 0.9 alone; the flat row needs all six to pass 0.9
    torch.testing.assert_close(w.sum(-1), torch.ones(1, 2))


def test_deep_tree_topp_count_follows_gate_confidence():
    gate = TreeGate(8, 16, "deep", rank=4, selection="topp", top_k=16, top_p=0.9)
    with torch.no_grad():
        gate.trunk.weight.zero_()
        gate.trunk.bias.fill_(1.0)
        gate.nodes.weight.zero_()
        gate.nodes.bias.fill_(5.0)  # take the first leaf with p = 0.993
    assert gate(torch.randn(1, 2, 8)).num_selected.tolist() == [[1, 1]]
    with torch.no_grad():
        gate.nodes.bias.fill_(-1.0)  # mass spreads down the caterpillar
    assert (gate(torch.randn(1, 2, 8)).num_selected > 3).all()


class NoHostSync(TorchDispatchMode):
    """Fails on any device-to-host read of tensor data (.item(), bool(t), int(t), .tolist() all go through it)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            raise AssertionError("host synchronisation in the routing forward")
        return func(*args, **(kwargs or {}))


def test_no_host_sync_in_forward():
    with NoHostSync():  # the check itself must be able to fail
        with pytest.raises(AssertionError):
            torch.ones(1).item()
    for shape, modes in (("balanced", ("dense", "topk", "topp", "beam")), ("deep", ("dense", "topk", "topp"))):
        gate = TreeGate(16, 8, shape, rank=4, intensity=True)
        h = torch.randn(2, 4, 16)
        for mode in modes:
            with NoHostSync():
                gate(h, mode)


def test_gate_computes_in_float32_for_bf16_input():
    gate = TreeGate(16, 8, "balanced", rank=4)
    route = gate(torch.randn(1, 4, 16, dtype=torch.bfloat16))
    assert route.weights.dtype == torch.float32 and route.leaf_logp.dtype == torch.float32


def test_route_loss_and_usage():
    gate = TreeGate(8, 4, "balanced", rank=4, selection="dense")
    route = gate(torch.randn(2, 5, 8))
    labels = path_labels("balanced", 4, torch.randint(0, 4, (2, 5)))
    loss, acc = route_loss(route, labels)
    # By hand: each token's path visits the root and one child; the loss is the mean BCE of the visited nodes'
    # decisions, a node's accuracy the share of its visiting tokens whose decision has the label's sign.
    terms, right = [], {m: [] for m in range(3)}
    for b in range(2):
        for t in range(5):
            for m in range(3):
                y, z = float(labels[b, t, m]), float(route.node_logits.detach()[b, t, m])
                if y < 0:
                    continue
                p = 1 / (1 + math.exp(-z))
                terms.append(-(y * math.log(p) + (1 - y) * math.log(1 - p)))
                right[m].append((z > 0) == (y == 1))
    assert loss.item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)
    for m in range(3):
        expected = sum(right[m]) / len(right[m]) if right[m] else float("nan")
        assert acc[m].item() == pytest.approx(expected, nan_ok=True)
    u = usage(route)
    torch.testing.assert_close(u.sum(), torch.tensor(1.0))
    assert effective_leaves(u).item() == pytest.approx(math.exp(-sum(p * math.log(p) for p in u.tolist())), rel=1e-5)
    assert effective_leaves(torch.full((4,), 0.25)).item() == pytest.approx(4.0)
    assert effective_leaves(torch.tensor([1.0, 0.0, 0.0, 0.0])).item() == pytest.approx(1.0)
    for shape, n in itertools.product(["balanced"], [4]):
        assert path_labels(shape, n, torch.tensor([0])).tolist() == [[0.0, 0.0, -1.0]]


@pytest.mark.parametrize("selection", ["topk", "topp", "beam"])
def test_selection_mass_counts_each_selected_leaf_weight(selection):
    gate = TreeGate(8, 16, "balanced", rank=4, selection=selection, top_k=3)
    route = gate(torch.randn(2, 5, 8))
    mask = torch.rand(2, 5) > 0.3
    expected = torch.zeros(16)
    for b, t in itertools.product(range(2), range(5)):
        for leaf, w in zip(route.indices[b, t].tolist(), route.weights[b, t].tolist()):
            expected[leaf] += w * mask[b, t].item()
    torch.testing.assert_close(selection_mass(route, 16, mask), expected)
    torch.testing.assert_close(selection_mass(route, 16, mask).sum(), mask.sum().float())  # one unit per token


def test_bank_vectors_reused_without_autograd_until_a_parameter_changes():
    from tree_of_experts.bank import ExpertBank

    bank, other = ExpertBank(torch.randn(8, 16)), ExpertBank(torch.randn(8, 16))
    with torch.no_grad():
        first = bank.vectors()
        assert bank.vectors() is first  # cached for generation
    opt = torch.optim.SGD(bank.parameters(), lr=0.5)
    (bank.vectors() ** 2).sum().backward()
    opt.step()
    fresh = (torch.nn.functional.normalize(bank.direction, dim=-1) * bank.norm[:, None]).detach()
    with torch.no_grad():
        assert not torch.equal(bank.vectors(), first) and torch.equal(bank.vectors(), fresh)
        bank.load_state_dict(other.state_dict())
        assert torch.equal(bank.vectors(), other.vectors())
