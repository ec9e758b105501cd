from __future__ import annotations

import json
import os

import pytest
import torch

from tree_of_experts import ToEError
from tree_of_experts.grading import grade, gsm8k_gold, last_boxed, normalize_number
from tree_of_experts.stats import gap_closed, gap_closed_ci, paired_bootstrap, wilson


@pytest.mark.parametrize("completion,gold,pred,ok", [
    ("so she pays $1,234.", "1234", "1234", True),
    ("The answer is -7", "-7", "-7", True),
    ("It costs $18.00 in total.", "18", "18", True),
    ("half is 0.5", "0.5", "0.5", True),
    ("first 3 then 4 #### 12 apples", "12", "12", True),
    ("2 + 2 = 5", "4", "5", False),
    ("no idea", "4", None, False),
    ("1,000,000 grains", "1000000", "1000000", True),
])
def test_gsm8k_grading(completion, gold, pred, ok):
    assert grade("gsm8k", completion, gold) == (pred, ok)


def test_gsm8k_gold_and_normalisation():
    assert gsm8k_gold("48/2 = <<48/2=24>>24\n#### 72") == "72"
    assert gsm8k_gold("no marker") is None
    assert normalize_number("$3.50") == "3.5" and normalize_number("-3.") == "-3" and normalize_number("x") is None


@pytest.mark.parametrize("completion,gold,ok", [
    (r"so \boxed{\frac{1}{2}}", r"\frac12", True),
    (r"\boxed{0.5}", r"\frac{1}{2}", True),
    (r"\boxed{\left( 3, \frac{\pi}{2} \right)}", r"\left( 3, \frac{\pi}{2} \right)", True),
    (r"\boxed{3}", "4", False),
    ("no box here", "4", False),
])
def test_math_grading(completion, gold, ok):
    assert grade("math", completion, gold)[1] is ok


def test_last_boxed_balances_braces():
    assert last_boxed(r"\boxed{1} then \boxed{\frac{a}{b}} end") == r"\frac{a}{b}"
    assert last_boxed(r"\boxed{unclosed") is None


def test_wilson_interval():
    lo, hi = wilson(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-3) and hi == pytest.approx(0.7634, abs=1e-3)
    assert wilson(0, 10)[0] == 0.0


def test_gap_arithmetic():
    assert gap_closed(1.0, 1.2, 0.8) == pytest.approx(0.5)  # CE: lower is better, signs cancel
    assert gap_closed(0.3, 0.2, 0.6) == pytest.approx(0.25)  # accuracy
    assert gap_closed(0.3, 0.2, 0.2) is None  # no gap: undefined, never a division by noise
    r = gap_closed_ci([1.0] * 20, [1.2] * 20, [0.8] * 20)
    assert r["gap_closed"] == pytest.approx(0.5) and r["defined"] and not r["format_adaptation_flag"]
    assert gap_closed_ci([0.5] * 20, [1.2] * 20, [0.8] * 20)["format_adaptation_flag"]


def test_paired_bootstrap():
    r = paired_bootstrap([1.0, 2.0, 3.0, 4.0], [0.0, 1.0, 2.0, 3.0])
    assert r["mean_diff"] == 1.0 and r["ci95"] == [1.0, 1.0] and r["p_positive"] == 1.0
    with pytest.raises(ValueError, match="same items"):
        paired_bootstrap([1.0], [1.0, 2.0])


def test_chat_template_prompts(tmp_path):
    from tree_of_experts.evaluate import evaluate
    from tree_of_experts.toy import tiny_qwen2, tiny_tokenizer

    fixture = os.path.join(os.path.dirname(__file__), "fixtures", "arith.jsonl")
    tok = tiny_tokenizer()
    tiny_qwen2(seed=0).save_pretrained(tmp_path / "plain")
    tok.save_pretrained(tmp_path / "plain")
    with pytest.raises(ToEError, match="has no chat template"):
        evaluate(base=str(tmp_path / "plain"), data=fixture, limit=2, template="chat", out=str(tmp_path / "x"))
    tok.chat_template = ("{% for m in messages %}User: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}Bot: {% endif %}")
    tiny_qwen2(seed=0).save_pretrained(tmp_path / "chat")
    tok.save_pretrained(tmp_path / "chat")
    m = evaluate(base=str(tmp_path / "chat"), data=fixture, limit=2, template="chat", max_new_tokens=3,
                 out=str(tmp_path / "ev"))
    assert m["args"]["template"] == "User: {prompt}\nBot: "  # recorded as rendered, so the run is reproducible
    question = json.loads(open(fixture).readline())["question"]
    row = json.loads(open(tmp_path / "ev" / "base.jsonl").readline())
    assert row["prompt"] == f"User: {question}\nBot: "
    # `toe generate --chat` wraps each free-form prompt the same way, and refuses a tokenizer without a template.
    from tree_of_experts.inference import generate

    with pytest.raises(ToEError, match="has no chat template; drop --chat"):
        generate(base=str(tmp_path / "plain"), prompt="hi", chat=True)
    gen = generate(base=str(tmp_path / "chat"), prompt=question, chat=True, max_new_tokens=3)
    assert gen[0]["completion"] == row["completion"]  # same prompt text, same greedy tokens


def test_tiny_end_to_end_eval(tmp_path):
    from tree_of_experts import ToEModel
    from tree_of_experts.evaluate import evaluate
    from tree_of_experts.toy import tiny_qwen2, tiny_tokenizer

    tok = tiny_tokenizer()
    for name, seed in (("base", 0), ("teacher", 1)):
        tiny_qwen2(seed=seed).save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    ToEModel.fresh(tiny_qwen2(seed=0), layers=[0], num_leaves=4).save_pretrained(tmp_path / "plug")
    fixture = os.path.join(os.path.dirname(__file__), "fixtures", "arith.jsonl")
    m = evaluate(base=str(tmp_path / "base"), plugin=str(tmp_path / "plug"), teacher=str(tmp_path / "teacher"),
                 task="gsm8k", data=fixture, out=str(tmp_path / "ev"), limit=4, max_new_tokens=4)
    assert set(m["systems"]) == {"base", "toe", "teacher"}
    # An untrained plug-in is the base exactly, item by item.
    assert m["systems"]["toe"]["ce"] == m["systems"]["base"]["ce"]
    rows = [json.loads(r) for r in open(tmp_path / "ev" / "toe.jsonl")]
    assert len(rows) == 4 and {"prompt", "completion", "extracted", "gold", "correct", "tokens", "ce"} <= set(rows[0])
    assert json.load(open(tmp_path / "ev" / "metrics.json"))["comparisons"]["toe"]["ce_gap_closed"]
    # CE on the teacher's own traces: its greedy completions are the target, so the teacher scores lowest there.
    from tree_of_experts.demo import toy_pair_dir
    from tree_of_experts.evaluate import traces

    toy = toy_pair_dir()  # trained toy models: they write real text
    t = traces(teacher=f"{toy}/teacher", data=fixture, out=str(tmp_path / "traces.jsonl"), limit=4,
               max_new_tokens=12, keep_incorrect=True, eval_out=str(tmp_path / "acc-teacher"))
    assert t["kept"] == 4
    # The traces' graded generations are an accuracy-only eval folder: the report pools them with `toe eval --ce
    # false` on the same rows, under an accuracy target.
    from tree_of_experts.report import report

    evaluate(base=f"{toy}/base", task="gsm8k", data=fixture, limit=4, max_new_tokens=12, ce=False,
             out=str(tmp_path / "acc-base"))
    report([str(tmp_path / "acc-base"), str(tmp_path / "acc-teacher")], out=str(tmp_path / "acc-rep"))
    rows = {r["system"]: r for r in json.load(open(tmp_path / "acc-rep" / "report.json"))}
    assert rows["teacher"]["accuracy"] == t["accuracy"] and rows["base"]["ce"] is None
    assert rows["teacher"]["target"].startswith("accuracy · arith.jsonl rows 0–4")
    base_acc = [json.loads(r) for r in open(tmp_path / "acc-base" / "base.jsonl")]
    assert rows["base"]["truncated_share"] == sum(r["truncated"] for r in base_acc) / 4
    assert "out of tokens)" in open(tmp_path / "acc-rep" / "report.md").read()
    # The same folder rebuilt from the traces file alone (re-graded, back in the data's order).
    from tree_of_experts.evaluate import eval_from_traces

    m = eval_from_traces(str(tmp_path / "traces.jsonl"), f"{toy}/teacher", fixture, str(tmp_path / "acc-t2"), limit=4,
                         max_new_tokens=12)
    again = [json.loads(r) for r in open(tmp_path / "acc-t2" / "teacher.jsonl")]
    first = [json.loads(r) for r in open(tmp_path / "acc-teacher" / "teacher.jsonl")]
    assert [r["prompt"] for r in again] == [r["prompt"] for r in first]
    assert [r["correct"] for r in again] == [r["correct"] for r in first]
    assert [r["truncated"] for r in again] == [r["truncated"] for r in first]  # the flag travels in the traces file
    assert all(r["truncated"] == (r["tokens"] >= 12) for r in base_acc)  # ended early or ran out
    assert m["systems"]["teacher"]["truncated_share"] == sum(r["truncated"] for r in first) / 4
    assert m["systems"]["teacher"]["accuracy"] == t["accuracy"]
    # The inverse: traces from the eval folder's answers, without running the teacher (same file as generating).
    t2 = traces(teacher=f"{toy}/teacher", data=fixture, out=str(tmp_path / "traces2.jsonl"), limit=4,
                max_new_tokens=12, keep_incorrect=True, from_eval=str(tmp_path / "acc-teacher"))
    assert open(tmp_path / "traces2.jsonl").read() == open(tmp_path / "traces.jsonl").read() and t2 == {
        **t, "out": str(tmp_path / "traces2.jsonl")}
    with pytest.raises(ToEError, match="max_new_tokens 12"):
        traces(teacher=f"{toy}/teacher", data=fixture, out=str(tmp_path / "x.jsonl"), limit=4, max_new_tokens=16,
               from_eval=str(tmp_path / "acc-teacher"))
    with pytest.raises(ToEError, match="skip/--limit"):
        traces(teacher=f"{toy}/teacher", data=fixture, out=str(tmp_path / "x.jsonl"), skip=4, limit=2,
               max_new_tokens=12, from_eval=str(tmp_path / "acc-teacher"))
    with pytest.raises(ToEError, match="no teacher answers"):
        traces(teacher=f"{toy}/teacher", data=fixture, out=str(tmp_path / "x.jsonl"), limit=4, max_new_tokens=12,
               from_eval=str(tmp_path / "acc-base"))
    assert not os.path.exists(tmp_path / "x.jsonl")
    with pytest.raises(ToEError, match="keep_incorrect"):
        eval_from_traces(str(tmp_path / "traces.jsonl"), f"{toy}/teacher", fixture, str(tmp_path / "x"), limit=6)
    m = evaluate(base=f"{toy}/base", teacher=f"{toy}/teacher", task="gsm8k",
                 data=str(tmp_path / "traces.jsonl"), out=str(tmp_path / "ev-trace"), ce_target="trace",
                 accuracy=False)
    assert m["systems"]["teacher"]["ce"] < m["systems"]["base"]["ce"]
    with pytest.raises(ToEError, match="toe traces"):
        evaluate(base=str(tmp_path / "base"), task="gsm8k", data=fixture, out=str(tmp_path / "x"), ce_target="trace")


def test_report_pools_eval_folders_on_the_same_items(tmp_path):
    from tree_of_experts import ToEModel
    from tree_of_experts.evaluate import evaluate
    from tree_of_experts.report import report
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
    usage = {u["system"]: u for u in json.load(open(tmp_path / "rep" / "leaf_usage.json"))}
    assert set(usage) == {"toe-b", "control"} and (tmp_path / "rep" / "usage.png").exists()
    for u in usage.values():  # shares of the selection mass of the 4-leaf plug-in at layer 0
        assert u["layer"] == 0 and len(u["usage"]) == 4 and abs(sum(u["usage"]) - 1) < 1e-5
        assert u["target"] == rows["toe-b"]["target"]  # which items the usage was counted on
        assert 1.0 <= u["effective_leaves"] <= 4.0 + 1e-5
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


def test_cli_accepts_dashes_and_positional_report_dirs():
    from tree_of_experts.cli import _normalise

    assert _normalise(["extract", "--num-leaves", "8", "--out=x"]) == ["extract", "--num_leaves", "8", "--out=x"]
    assert _normalise(["report", "a", "b", "--out", "r"]) == ["report", "--run_dirs", '["a", "b"]', "--out", "r"]


def test_cli_errors_are_one_line(capsys, tmp_path):
    from tree_of_experts.cli import main

    assert main(["generate", "--base", str(tmp_path), "--plugin", str(tmp_path / "none"), "--prompt", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("toe: error:")


def test_data_from_a_datasets_split(tmp_path):
    """`hf:NAME[:CONFIG]:SPLIT` goes through datasets.load_dataset (here a local folder, no network)."""
    from tree_of_experts.data import file_hash, read_jsonl

    folder = tmp_path / "arith"
    folder.mkdir()
    fixture = os.path.join(os.path.dirname(__file__), "fixtures", "arith.jsonl")
    (folder / "train.jsonl").write_text(open(fixture).read())
    rows = read_jsonl(f"hf:{folder}:train", limit=3)
    assert rows == read_jsonl(fixture, limit=3)
    assert len(file_hash(f"hf:{folder}:train")) == 64
    with pytest.raises(ToEError, match="hf:NAME:SPLIT"):
        read_jsonl("hf:only-a-name")
    with pytest.raises(ToEError, match="could not load"):
        read_jsonl(f"hf:{folder}:nosuchsplit")


def test_sweep_plot_reads_n_and_k_from_labels(tmp_path):
    from tree_of_experts.report import sweep_plot, sweep_points

    def row(system, ce):
        return {"target": "t", "system": system, "ce": ce, "ce_ci95": [ce - 0.1, ce + 0.1], "accuracy": None,
                "accuracy_ci95": None}

    rows = [row("base", 2.0), row("teacher", 1.0), row("ToE-B (N=32, K=4)", 1.5), row("N=8", 1.8),
            row("N=128", 1.4), row("K=1", 1.9), row("layer 2", 1.6)]
    assert [v for v, _ in sweep_points(rows, "N")] == [8, 32, 128]
    assert [r["system"] for _, r in sweep_points(rows, "K")] == ["K=1", "ToE-B (N=32, K=4)"]
    assert sweep_plot(rows, str(tmp_path / "s.png")) and (tmp_path / "s.png").stat().st_size > 0
    assert not sweep_plot(rows[:3], str(tmp_path / "none.png"))  # fewer than 3 values of any knob: no plot
