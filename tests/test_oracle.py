"""`toe oracle`: O1 (the live teacher through the maps), O2 (oracle routing), live O1 generation, and its folder
pooled with `toe eval` folders."""

from __future__ import annotations

import json
import os

import pytest
import torch

from tree_of_experts import ToEError

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "arith.jsonl")


def test_oracle_table_has_every_row(experts, tmp_path):
    from tree_of_experts.commands.oracle import oracle

    r = oracle(teacher=str(experts / "teacher"), base=str(experts / "base"), experts=str(experts / "ex"), data=FIXTURE,
               out=str(tmp_path / "or"), plugin=str(experts / "ex"), limit=6, generate=True, max_new_tokens=6)
    names = set(r["systems"])
    assert {"base", "teacher", "O1 trained map", "O2 oracle routing", "static vector", "ToE (learned)"} <= names
    # The untrained plug-in (s = 0) is exactly the base.
    assert r["systems"]["ToE (learned)"]["ce"] == r["systems"]["base"]["ce"]
    assert (tmp_path / "or" / "oracle.md").exists()
    assert set(r["generation"]) == {"base", "teacher", "ToE (learned)", "O1 trained map"}
    assert len((tmp_path / "or" / "generation.jsonl").read_text().splitlines()) == 4 * 6


def test_oracle_rows_pool_with_toe_eval(experts, tmp_path):
    """The oracle folder is also an eval folder: `toe report` pools O1/O2 with `toe eval` runs on the same items,
    and the oracle's base CE is the one `toe eval` measures."""
    from tree_of_experts.commands.evaluate import evaluate
    from tree_of_experts.commands.oracle import oracle
    from tree_of_experts.evaluation.tables import pool, table_rows

    oracle(teacher=str(experts / "teacher"), base=str(experts / "base"), experts=str(experts / "ex"), data=FIXTURE,
           out=str(tmp_path / "oracle"), limit=5, lambdas=(0.5,))
    evaluate(base=str(experts / "base"), teacher=str(experts / "teacher"), data=FIXTURE, limit=5, accuracy=False,
             out=str(tmp_path / "ev"))
    groups = pool([str(tmp_path / "ev"), str(tmp_path / "oracle")])
    (systems,) = groups.values()
    assert {"base", "teacher", "oracle:O1-map", "oracle:O2-routing", "oracle:O1-ridge-0.5"} <= set(systems)
    with open(tmp_path / "oracle" / "base.jsonl") as f:
        oracle_base = [json.loads(line)["ce"] for line in f]
    assert oracle_base == pytest.approx([r["ce"] for r in systems["base"]], abs=1e-4)
    rows = {r["system"]: r for r in table_rows(groups, reference="oracle:O1-map")}
    assert rows["oracle:O2-routing"]["ce_vs_reference"] is not None
    with pytest.raises(ToEError, match="toe traces"):
        oracle(teacher=str(experts / "teacher"), base=str(experts / "base"), experts=str(experts / "ex"), data=FIXTURE,
               out=str(tmp_path / "o2"), ce_target="trace")


def test_live_o1_generation_matches_a_teacher_forced_recompute(experts):
    """The cached loop (teacher fed each generated token) injects exactly what a full teacher-forced pass would."""
    from tree_of_experts.commands.oracle import live_greedy
    from tree_of_experts.hf.layers import add_to_layers, capture_layers
    from tree_of_experts.hf.loading import load_causal_lm, load_tokenizer

    tok = load_tokenizer(str(experts / "base"))
    base, teacher = load_causal_lm(str(experts / "base")), load_causal_lm(str(experts / "teacher"))
    w = torch.randn(48, 32, generator=torch.Generator().manual_seed(0))
    delta = lambda j, u, h: u.float() @ w  # noqa: E731
    prompt = "what is 3 plus 4?"
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    plain = live_greedy(base, tok, prompt, 8)
    ref = base.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    assert plain == ref[0, ids.shape[1]:].tolist()[: len(plain)]
    live = live_greedy(base, tok, prompt, 8, teacher, [0], [1], delta)
    assert len(plain) > 2 and live != plain  # the injection changed the answer
    full = torch.cat([ids, torch.tensor([live])], 1)
    with torch.no_grad(), capture_layers(teacher, [1]) as u:
        teacher(input_ids=full)
    keep = torch.ones(1, full.shape[1], 1)
    keep[:, 0] = 0
    with torch.no_grad(), add_to_layers(base, {0: lambda h: delta(0, u[1], h) * keep}):
        logits = base(input_ids=full).logits
    n = ids.shape[1]
    assert torch.equal(logits[0, n - 1 : -1].argmax(-1), full[0, n:])


def test_the_predictability_ceiling_fits_delta_from_h_and_injects_the_prediction(experts, tmp_path):
    from tree_of_experts.commands.oracle import oracle

    r = oracle(teacher=str(experts / "teacher"), base=str(experts / "base"), experts=str(experts / "ex"), data=FIXTURE,
               out=str(tmp_path / "or"), limit=6, ceiling_only=True)
    assert {"predicted δ̂(h): ridge", "predicted δ̂(h): MLP", "static vector", "O1 trained map"} <= set(r["systems"])
    assert "O2 oracle routing" not in r["systems"] and not any("ridge λ" in k for k in r["systems"])
    for layer, e in r["predictability"].items():  # one entry per injection layer, R² at most 1
        assert e["r2_ridge"] <= 1 and e["r2_mlp"] <= 1 and 0 <= e["mean_share"] <= 1 and e["heldout_tokens"] > 0
    assert (tmp_path / "or" / "predicted-ridge.jsonl").exists() and "held-out R²" in (tmp_path / "or" / "oracle.md").read_text()


def test_r2_is_one_for_a_linear_signal_and_near_zero_for_noise():
    from tree_of_experts.extraction.predictability import fit_mlp, fit_ridge, r2

    g = torch.Generator().manual_seed(0)
    h, h2 = torch.randn(2000, 8, generator=g), torch.randn(500, 8, generator=g)
    w = torch.randn(8, 4, generator=g)
    d, d2 = h @ w + 1.0, h2 @ w + 1.0  # δ is a linear function of h (plus a mean)
    assert r2(fit_ridge(h, d)(h2).detach(), d2, d.mean(0)) > 0.999
    noise, noise2 = torch.randn(2000, 4, generator=g), torch.randn(500, 4, generator=g)
    assert abs(r2(fit_ridge(h, noise)(h2).detach(), noise2, noise.mean(0))) < 0.05  # nothing to predict
    assert r2(fit_mlp(h, torch.tanh(h[:, :4]) * 2)(h2).detach(), torch.tanh(h2[:, :4]) * 2,
              (torch.tanh(h[:, :4]) * 2).mean(0)) > 0.9  # a non-linear signal: the MLP finds it
