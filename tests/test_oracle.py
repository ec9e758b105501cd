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
    from tree_of_experts.commands.report import pool, table_rows

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
    from tree_of_experts.hf import add_to_layers, capture_layers, load_causal_lm, load_tokenizer

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
