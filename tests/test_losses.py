"""tree_of_experts.losses: the top-k KL, token CE on the kept tail, the generalized JSD (checked against trl's GKD)
and the state loss, against formulas by hand."""

from __future__ import annotations

import math

import pytest
import torch

from tree_of_experts.losses import gathered_generalized_jsd, generalized_jsd
from tree_of_experts.toy import tiny_qwen2
from tree_of_experts.training.distill import onpolicy_divergence


def kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q))


def test_topk_losses_match_the_full_softmax_formulas():
    import torch.nn.functional as F

    from tree_of_experts.losses import token_nll, topk_kl, topk_logprobs

    g = torch.Generator().manual_seed(0)
    logits, teacher = torch.randn(2, 7, 50, generator=g), torch.randn(2, 7, 50, generator=g)
    ids = torch.randint(0, 50, (2, 7), generator=g)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[:, 0] = False
    nll, top_ids, top_logp = topk_logprobs(teacher, ids, mask, 5)
    full = teacher[:, :-1].log_softmax(-1)
    assert torch.allclose(nll, token_nll(teacher, ids, mask), atol=1e-5)
    assert torch.allclose(top_logp, full.topk(5, dim=-1).values, atol=1e-5)
    ids_t, logp_t = F.pad(top_ids, (0, 0, 1, 0)), F.pad(top_logp, (0, 0, 1, 0))  # stored at target positions
    student = F.pad(logits[:, :-1], (0, 0, 1, 0)).log_softmax(-1).gather(-1, ids_t)
    s = student - student.logsumexp(-1, keepdim=True)
    t = logp_t - logp_t.logsumexp(-1, keepdim=True)
    expected = (t.exp() * (t - s)).sum(-1) * mask
    assert torch.allclose(topk_kl(logits, ids_t, logp_t, mask), expected, atol=1e-5)


def test_losses_on_the_kept_tail_equal_the_full_batch():
    """`toe train` asks the model for logits at the tail that holds every target (logits_to_keep): CE and top-k KL
    of a left-padded batch are the full-sequence values."""
    from tree_of_experts.hf.layers import padded_inputs
    from tree_of_experts.losses import tail_length, tail_positions, token_nll, topk_kl

    model = tiny_qwen2(hidden_size=32, num_layers=2, seed=0)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 60, (3, 12), generator=g)
    am = torch.ones_like(ids)
    am[0, :4] = 0  # left padding
    am[1, :2] = 0
    mask = torch.zeros(3, 12, dtype=torch.bool)
    mask[0, 9:], mask[1, 6:], mask[2, 8:] = True, True, True  # responses of different lengths
    topk_ids, topk_logp = torch.randint(0, 64, (3, 12, 4), generator=g), torch.randn(3, 12, 4, generator=g)
    keep = tail_length(mask)
    assert keep == 12 - 6 + 1 and tail_length(torch.zeros(2, 5, dtype=torch.bool)) == 1
    with torch.no_grad():
        full = model(**padded_inputs(ids, am, "cpu")).logits
        tail = model(**padded_inputs(ids, am, "cpu"), logits_to_keep=tail_positions(mask, "cpu")).logits
    assert tail.shape[1] == keep
    t = slice(-keep, None)
    torch.testing.assert_close(token_nll(tail, ids[:, t], mask[:, t]).sum(), token_nll(full, ids, mask).sum())
    torch.testing.assert_close(topk_kl(tail, topk_ids[:, t], topk_logp[:, t], mask[:, t]).sum(),
                               topk_kl(full, topk_ids, topk_logp, mask).sum())


def test_the_state_loss_equals_a_hand_computed_value():
    from tree_of_experts.losses import state_loss

    h = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [0.0, 0.0]]])  # (B=1, T=3, D=2), one layer
    target = torch.tensor([[[[1.5, 2.0], [3.0, 3.0], [9.0, 9.0]]]])  # (B, L=1, T, D): h0 + δ
    norm2 = torch.tensor([[[0.5, 2.0, 0.0]]])  # ‖δ‖²; the third token has no target
    # (0.5² + 0²) + (0² + 1²) over 0.5 + 2.0
    assert state_loss([h], target, norm2).item() == pytest.approx((0.25 + 1.0) / 2.5)


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
def test_generalized_jsd_matches_the_formula_by_hand(beta):
    s_logits, t_logits = torch.tensor([[1.0, 0.0, -1.0]]), torch.tensor([[0.0, 2.0, 0.5]])
    s = torch.softmax(s_logits, -1)[0].tolist()
    t = torch.softmax(t_logits, -1)[0].tolist()
    if beta == 0.0:
        want = kl(t, s)
    elif beta == 1.0:
        want = kl(s, t)
    else:
        m = [beta * a + (1 - beta) * b for a, b in zip(t, s)]
        want = beta * kl(t, m) + (1 - beta) * kl(s, m)
    got = generalized_jsd(s_logits, t_logits, beta)
    assert got.shape == (1,) and got.item() == pytest.approx(want, rel=1e-5)
    assert generalized_jsd(t_logits, t_logits, beta).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
def test_generalized_jsd_and_its_gradient_match_trls_gkd_trainer(beta, monkeypatch):
    """The reference implementation of the same objective (trl's GKDTrainer.generalized_jsd_loss), per position and
    in the student's gradient, on random logits over a wide vocabulary."""
    pytest.importorskip("trl")
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")  # the GKD trainer sits in trl.experimental since 1.0
    try:
        from trl.experimental.gkd import GKDTrainer
    except ImportError:
        from trl import GKDTrainer  # trl < 1.0
    g = torch.Generator().manual_seed(2)
    s, t = (torch.randn(6, 257, generator=g) * 3).requires_grad_(), torch.randn(6, 257, generator=g) * 3
    ours = generalized_jsd(s, t, beta)
    theirs = GKDTrainer.generalized_jsd_loss(s[None], t[None], beta=beta, reduction="none").sum(-1)[0]  # (N,)
    assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    (grad_ours,) = torch.autograd.grad(ours.sum(), s)
    (grad_theirs,) = torch.autograd.grad(theirs.sum(), s)
    assert torch.allclose(grad_ours, grad_theirs, rtol=1e-4, atol=1e-6)


def test_divergence_sits_at_the_targets_and_ignores_a_padded_teacher_vocabulary():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 7, generator=g), torch.randn(2, 5, 9, generator=g)  # teacher vocabulary padded to 9
    mask = torch.tensor([[0, 0, 1, 1, 0], [0, 1, 1, 1, 1]], dtype=torch.bool)
    out = onpolicy_divergence(s, t, mask, 0.5)
    assert out.shape == (2, 5) and torch.all(out[~mask] == 0) and torch.all(out[mask] > 0)
    # target (0, 2) is predicted at position (0, 1)
    assert out[0, 2].item() == pytest.approx(generalized_jsd(s[0, 1:2], t[0, 1:2, :7], 0.5).item(), rel=1e-6)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_chunked_divergence_gives_the_plain_values_and_gradient(beta):
    # bounded memory (a few positions at a time, the backward recomputing each chunk) must not change the loss
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(3, 6, 11, generator=g), torch.randn(3, 6, 13, generator=g)
    rows, cols = torch.tensor([0, 0, 1, 2, 2, 2, 1]), torch.tensor([1, 2, 0, 3, 4, 5, 5])
    w = torch.rand(len(rows), generator=g)  # a non-uniform upstream gradient
    plain = s.clone().requires_grad_()
    want = generalized_jsd(plain[rows, cols], t[rows, cols, :11], beta)
    (want * w).sum().backward()
    for chunk in (1, 3, 100):
        got_s = s.clone().requires_grad_()
        got = gathered_generalized_jsd(got_s, t, rows, cols, beta, chunk=chunk)
        (got * w).sum().backward()
        torch.testing.assert_close(got, want.detach(), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(got_s.grad, plain.grad, rtol=1e-5, atol=1e-7)
    assert torch.all(plain.grad[2, 0] == 0)  # positions not scored get no gradient
    twice = s.clone().requires_grad_()  # a position listed twice counts twice, as in the plain gather
    gathered_generalized_jsd(twice, t, torch.tensor([0, 0]), torch.tensor([1, 1]), beta, chunk=1).sum().backward()
    once = s.clone().requires_grad_()
    generalized_jsd(once[0, 1:2], t[0, 1:2, :11], beta).sum().backward()
    torch.testing.assert_close(twice.grad, 2 * once.grad)
