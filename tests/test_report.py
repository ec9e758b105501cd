"""`toe report`: pooling eval folders, paired comparisons, sweep plots."""

from __future__ import annotations

import json
import math
import os
import shutil

import pytest
import torch

from tree_of_experts.config import ToEError


def test_report_pools_eval_folders_on_the_same_items(tmp_path):
    from tree_of_experts import ToEModel
    from tree_of_experts.commands.evaluate import evaluate
    from tree_of_experts.commands.report import report
    from tree_of_experts.toy import tiny_qwen2, tiny_tokenizer

    tok = tiny_tokenizer()
    for name, seed in (("base", 0), ("teacher", 1)):
        tiny_qwen2(seed=seed).save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    for name, scale in (("toe", 0.5), ("ctl", 2.0)):
        m = ToEModel.fresh(tiny_qwen2(seed=0), layers=[0], num_leaves=4)
        with torch.no_grad():
            m.plugin.blocks["0"].scale.fill_(scale)
            m.plugin.blocks["0"].bank.norm.fill_(3.0)
        m.save_pretrained(tmp_path / name)
    fixture = os.path.join(os.path.dirname(__file__), "fixtures", "arith.jsonl")
    common = dict(base=str(tmp_path / "base"), task="gsm8k", data=fixture, limit=6, accuracy=False)
    evaluate(plugin=str(tmp_path / "toe"), teacher=str(tmp_path / "teacher"), out=str(tmp_path / "toe-b"), **common)
    evaluate(plugin=str(tmp_path / "ctl"), with_base=False, out=str(tmp_path / "control"), **common)
    report([str(tmp_path / "toe-b"), str(tmp_path / "control")], out=str(tmp_path / "rep"))
    rows = {r["system"]: r for r in json.load(open(tmp_path / "rep" / "report.json"))}
    assert list(rows) == ["base", "teacher", "toe-b", "control"]
    ctl, toe = rows["control"], rows["toe-b"]
    assert ctl["ce_gap_closed"]["gap_closed"] is not None  # the teacher came from the other folder
    assert ctl["reference"] == "toe-b" and toe["reference"] is None
    assert abs(ctl["ce_vs_reference"]["mean_diff"] - (ctl["ce"] - toe["ce"])) < 1e-9
    assert "CE minus toe-b" in open(tmp_path / "rep" / "report.md").read()
    # Named paired comparisons beyond the one reference: A minus B item by item.
    report([str(tmp_path / "toe-b"), str(tmp_path / "control")], out=str(tmp_path / "rep"),
           pairs=["toe-b:control", "control:base"])
    pairs = {(r["a"], r["b"]): r for r in json.load(open(tmp_path / "rep" / "pairs.json"))}
    assert set(pairs) == {("toe-b", "control"), ("control", "base")}
    assert pairs[("toe-b", "control")]["ce"]["mean_diff"] == pytest.approx(toe["ce"] - ctl["ce"], abs=1e-9)
    assert pairs[("control", "base")]["ce"]["mean_diff"] == pytest.approx(ctl["ce"] - rows["base"]["ce"], abs=1e-9)
    assert pairs[("toe-b", "control")]["accuracy"] is None  # CE-only folders
    assert "| toe-b − control | 6 |" in open(tmp_path / "rep" / "report.md").read()
    with pytest.raises(ToEError, match="known: base, control, teacher, toe-b"):
        report([str(tmp_path / "toe-b"), str(tmp_path / "control")], out=str(tmp_path / "rep"), pairs=["toe:ctl"])
    from tree_of_experts.cli import main

    assert main(["report", str(tmp_path / "toe-b"), str(tmp_path / "control"), "--out", str(tmp_path / "rep3"),
                 "--pairs", "toe-b:control,control:base"]) == 0  # the command line takes a comma list
    assert len(json.load(open(tmp_path / "rep3" / "pairs.json"))) == 2
    report([str(tmp_path / "toe-b"), str(tmp_path / "control")], out=str(tmp_path / "rep3"))
    assert not (tmp_path / "rep3" / "pairs.json").exists()  # a report without pairs leaves no stale pairs file
    with pytest.raises(ToEError, match="--reference 'nosuch' is none of the pooled systems: use one of base"):
        report([str(tmp_path / "toe-b")], out=str(tmp_path / "rep4"), reference="nosuch")
    with pytest.raises(ToEError, match="two different pooled systems"):
        report([str(tmp_path / "toe-b")], out=str(tmp_path / "rep4"), pairs=["toe-b:toe-b"])
    shutil.copytree(tmp_path / "toe-b", tmp_path / "eval")  # the plug-in's folder under another name
    report([str(tmp_path / "eval"), str(tmp_path / "control")], out=str(tmp_path / "rep5"))
    rows5 = {r["system"]: r for r in json.load(open(tmp_path / "rep5" / "report.json"))}
    assert rows5["control"]["reference"] == "eval"  # the default reference is the folder whose system is the plug-in
    usage = {u["system"]: u for u in json.load(open(tmp_path / "rep" / "leaf_usage.json"))}
    assert set(usage) == {"toe-b", "control"} and (tmp_path / "rep" / "usage.png").exists()
    for u in usage.values():  # shares of the selection mass of the 4-leaf plug-in at layer 0
        assert u["layer"] == 0 and len(u["usage"]) == 4 and abs(sum(u["usage"]) - 1) < 1e-5
        assert u["target"] == rows["toe-b"]["target"]  # which items the usage was counted on
        entropy = -sum(p * math.log(p) for p in u["usage"] if p > 0)
        assert u["effective_leaves"] == pytest.approx(math.exp(entropy), rel=1e-4)  # exp(entropy) of the shares
    assert "Leaf usage at inference" in open(tmp_path / "rep" / "report.md").read()
    k1 = evaluate(plugin=str(tmp_path / "toe"), with_base=False, plugin_top_k=1, out=str(tmp_path / "k1"), **common)
    assert k1["args"]["routing"] == {"selection": None, "top_k": 1, "top_p": None}  # K=1 of the plug-in's 4
    assert abs(k1["systems"]["toe"]["ce"] - rows["toe-b"]["ce"]) > 1e-4
    with pytest.raises(ToEError, match="system label"):
        report([str(tmp_path / "control"), str(tmp_path / "control")], out=str(tmp_path / "rep2"))
    rows_path = tmp_path / "control" / "toe.jsonl"  # same prompts, another target text: refused, not pooled
    rows = [json.loads(line) for line in open(rows_path)]
    rows[0]["ce_tokens"] += 1
    rows_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ToEError, match="different target texts"):
        report([str(tmp_path / "toe-b"), str(tmp_path / "control")], out=str(tmp_path / "rep3"))


def test_sweep_plot_reads_n_and_k_from_labels(tmp_path):
    from tree_of_experts.evaluation.tables import sweep_plot, sweep_points

    def row(system, ce):
        return {"target": "t", "system": system, "ce": ce, "ce_ci95": [ce - 0.1, ce + 0.1], "accuracy": None,
                "accuracy_ci95": None}

    rows = [row("base", 2.0), row("teacher", 1.0), row("ToE-B (N=32, K=4)", 1.5), row("N=8", 1.8),
            row("N=128", 1.4), row("K=1", 1.9), row("layer 2", 1.6)]
    assert [v for v, _ in sweep_points(rows, "N")] == [8, 32, 128]
    assert [r["system"] for _, r in sweep_points(rows, "K")] == ["K=1", "ToE-B (N=32, K=4)"]
    assert sweep_plot(rows, str(tmp_path / "s.png")) and (tmp_path / "s.png").stat().st_size > 0
    assert not sweep_plot(rows[:3], str(tmp_path / "none.png"))  # fewer than 3 values of any knob: no plot


def test_sampled_and_greedy_answers_are_never_pooled():
    """Accuracy from sampled answers is another measurement than greedy accuracy: folders that sampled answers form
    a target of their own (named with the sampling settings); a CE-only folder, whose scores do not depend on
    decoding, pools with greedy ones."""
    from tree_of_experts.evaluation.tables import _target
    from tree_of_experts.inference import Sampling

    common = dict(data="dev.jsonl", skip=56, limit=100, few_shot=0, ce_target="trace")
    greedy = _target({**common, "ce": True, "accuracy": True, **Sampling().record()})
    sampled = _target({**common, "ce": True, "accuracy": True, **Sampling(0.7, 0.95, 4, 0).record()})
    ce_only = _target({**common, "ce": True, "accuracy": False, **Sampling(0.7, 0.95, 4, 0).record()})
    assert greedy == ce_only == "trace CE · dev.jsonl rows 56–155 · 0-shot"
    assert sampled == greedy + " · sampled T=0.7, top-p 0.95, k=4"
    assert _target({**common, "ce": True, "accuracy": True}) == greedy  # folders from before decoding was recorded


def test_small_or_non_finite_evaluations_are_flagged_not_printed_as_numbers(tmp_path):
    from tree_of_experts.evaluation.results import summarize
    from tree_of_experts.evaluation.tables import markdown, table_rows
    from tree_of_experts.stats import MIN_INTERVAL_N, bootstrap_mean, paired_bootstrap

    assert bootstrap_mean([0.5])[1:] == (None, None) and MIN_INTERVAL_N == 3
    assert paired_bootstrap([1.0, 2.0], [0.0, 0.0])["ci95"] == [None, None]
    one = [{"prompt": "p", "ce": 0.4, "ce_tokens": 3}]
    assert summarize(one)["ce_ci95"] == [None, None]
    rows = [{"prompt": f"p{i}", "ce": v, "ce_tokens": 3} for i, v in enumerate([0.4, None, 0.5])]  # NaN -> null
    s = summarize(rows)
    assert s["ce"] is None and s["ce_nonfinite"] == 1
    table = markdown(table_rows({"t": {"base": one, "toe": one}}) + table_rows({"u": {"base": rows, "toe": rows}}))
    assert "nan" not in table.lower() and "no interval below 3 items" in table and "non-finite on 1 of 3 items" in table
