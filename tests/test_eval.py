from __future__ import annotations

import json
import os
import re

import pytest

from tree_of_experts import ToEError


def test_chat_template_prompts(tmp_path):
    from tree_of_experts.commands.evaluate import evaluate
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
    from tree_of_experts.commands.generate import generate

    with pytest.raises(ToEError, match="has no chat template; drop --chat"):
        generate(base=str(tmp_path / "plain"), prompt="hi", chat=True)
    gen = generate(base=str(tmp_path / "chat"), prompt=question, chat=True, max_new_tokens=3)
    assert gen[0]["completion"] == row["completion"]  # same prompt text, same greedy tokens


FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "arith.jsonl")


def test_tiny_end_to_end_eval(tmp_path):
    from tree_of_experts import ToEModel
    from tree_of_experts.commands.evaluate import evaluate
    from tree_of_experts.toy import tiny_qwen2, tiny_tokenizer

    tok = tiny_tokenizer()
    for name, seed in (("base", 0), ("teacher", 1)):
        tiny_qwen2(seed=seed).save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    ToEModel.fresh(tiny_qwen2(seed=0), layers=[0], num_leaves=4).save_pretrained(tmp_path / "plug")
    m = evaluate(base=str(tmp_path / "base"), plugin=str(tmp_path / "plug"), teacher=str(tmp_path / "teacher"),
                 task="gsm8k", data=FIXTURE, out=str(tmp_path / "ev"), limit=4, max_new_tokens=4)
    assert set(m["systems"]) == {"base", "toe", "teacher"}
    # An untrained plug-in is the base exactly, item by item.
    assert m["systems"]["toe"]["ce"] == m["systems"]["base"]["ce"]
    rows = [json.loads(r) for r in open(tmp_path / "ev" / "toe.jsonl")]
    assert len(rows) == 4 and {"prompt", "completion", "extracted", "gold", "correct", "tokens", "ce"} <= set(rows[0])
    gap = m["comparisons"]["toe"]["ce_gap_closed"]  # the base's own CE: nothing of the gap closed, on every item
    assert gap["gap_closed"] == 0.0 and gap["ci95"] == [0.0, 0.0]


def test_the_cli_prints_a_short_summary_and_plain_progress_lines(tmp_path, capsys, caplog, monkeypatch):
    """Without a terminal `toe eval` logs plain progress lines (no bar) and prints one screen naming metrics.json,
    not the whole file; its decode paths warn of no deprecated cache argument; the data is a Dataset saved with
    save_to_disk."""
    import warnings

    import datasets

    import tree_of_experts.evaluation.scoring
    from tree_of_experts import ToEModel
    from tree_of_experts.cli import main
    from tree_of_experts.toy import tiny_qwen2, tiny_tokenizer

    tok = tiny_tokenizer()
    for name, seed in (("base", 0), ("teacher", 1)):
        tiny_qwen2(seed=seed).save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    ToEModel.fresh(tiny_qwen2(seed=0), layers=[0], num_leaves=4).save_pretrained(tmp_path / "plug")
    datasets.Dataset.from_list([json.loads(line) for line in open(FIXTURE)]).save_to_disk(str(tmp_path / "data"))
    monkeypatch.setattr(tree_of_experts.evaluation.scoring, "PROGRESS_S", 0.0)  # a line after every batch
    out = str(tmp_path / "ev")
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["eval", "--base", str(tmp_path / "base"), "--plugin", str(tmp_path / "plug"), "--teacher",
                     str(tmp_path / "teacher"), "--data", f"hf:{tmp_path / 'data'}", "--out", out, "--limit", "4",
                     "--max_new_tokens", "4", "--batch_size", "2"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) < 20 and os.path.join(out, "metrics.json") in printed[-1], printed
    assert [line.split()[0] for line in printed[1:4]] == ["base", "toe", "teacher"] and '"systems"' not in printed
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    assert "summary" not in metrics and metrics["systems"]["toe"]["n"] == 4  # the file keeps the full metrics
    progress = [r.getMessage() for r in caplog.records if "items/s" in r.getMessage()]
    for system in ("base", "toe", "teacher"):
        assert any(re.fullmatch(rf"generate {system}: 4/4 items, [\d.]+ items/s", p) for p in progress), progress
        assert any(p.startswith(f"CE {system}: 2/4 items") for p in progress), progress
    assert not [str(w.message) for w in caught if "past_key_values" in str(w.message)]


@pytest.fixture(scope="module")
def toy_traces(tmp_path_factory):
    """The trained toy teacher's traces of 4 fixture rows (12 tokens, incorrect kept) and its graded answers as an
    accuracy-only eval folder: (folder, toy pair dir, the traces summary)."""
    from tree_of_experts.commands.evaluate import traces
    from tree_of_experts.recipes.demo import toy_pair_dir

    d, toy = tmp_path_factory.mktemp("traces"), toy_pair_dir()  # trained toy models: they write real text
    t = traces(teacher=f"{toy}/teacher", data=FIXTURE, out=str(d / "traces.jsonl"), limit=4, max_new_tokens=12,
               keep_incorrect=True, eval_out=str(d / "acc-teacher"))
    return d, toy, t


def test_traces_eval_folder_pools_with_toe_eval(toy_traces, tmp_path):
    # The traces' graded generations are an accuracy-only eval folder: the report pools them with `toe eval --ce
    # false` on the same rows, under an accuracy target.
    from tree_of_experts.commands.evaluate import evaluate
    from tree_of_experts.commands.report import report

    d, toy, t = toy_traces
    assert t["kept"] == 4
    evaluate(base=f"{toy}/base", task="gsm8k", data=FIXTURE, limit=4, max_new_tokens=12, ce=False,
             out=str(tmp_path / "acc-base"))
    report([str(tmp_path / "acc-base"), str(d / "acc-teacher")], out=str(tmp_path / "acc-rep"))
    rows = {r["system"]: r for r in json.load(open(tmp_path / "acc-rep" / "report.json"))}
    assert rows["teacher"]["accuracy"] == t["accuracy"] and rows["base"]["ce"] is None
    assert rows["teacher"]["target"].startswith("accuracy · arith.jsonl rows 0–3")
    base_acc = [json.loads(r) for r in open(tmp_path / "acc-base" / "base.jsonl")]
    assert rows["base"]["truncated_share"] == sum(r["truncated"] for r in base_acc) / 4
    assert all(r["truncated"] == (r["tokens"] >= 12) for r in base_acc)  # ended early or ran out
    assert "out of tokens)" in open(tmp_path / "acc-rep" / "report.md").read()


def test_eval_folder_rebuilt_from_the_traces_file(toy_traces, tmp_path):
    # The same folder rebuilt from the traces file alone (re-graded, back in the data's order), in Python and as
    # `toe eval-traces`.
    from tree_of_experts.cli import main
    from tree_of_experts.commands.evaluate import eval_from_traces

    d, toy, t = toy_traces
    m = eval_from_traces(str(d / "traces.jsonl"), f"{toy}/teacher", FIXTURE, str(tmp_path / "acc-t2"), limit=4,
                         max_new_tokens=12)
    again = [json.loads(r) for r in open(tmp_path / "acc-t2" / "teacher.jsonl")]
    first = [json.loads(r) for r in open(d / "acc-teacher" / "teacher.jsonl")]
    assert [r["prompt"] for r in again] == [r["prompt"] for r in first]
    assert [r["correct"] for r in again] == [r["correct"] for r in first]
    assert [r["truncated"] for r in again] == [r["truncated"] for r in first]  # the flag travels in the traces file
    assert m["systems"]["teacher"]["truncated_share"] == sum(r["truncated"] for r in first) / 4
    assert m["systems"]["teacher"]["accuracy"] == t["accuracy"]
    cli = ["eval-traces", "--traces-file", str(d / "traces.jsonl"), "--teacher", f"{toy}/teacher", "--data", FIXTURE,
           "--limit", "4", "--max-new-tokens", "12", "--out", str(tmp_path / "acc-t3")]
    assert main(cli) == 0
    assert open(tmp_path / "acc-t3" / "teacher.jsonl").read() == open(tmp_path / "acc-t2" / "teacher.jsonl").read()
    assert main(cli) == 2  # the finished folder is not replaced without --overwrite
    with pytest.raises(ToEError, match="keep_incorrect"):
        eval_from_traces(str(d / "traces.jsonl"), f"{toy}/teacher", FIXTURE, str(tmp_path / "x"), limit=6)


def test_traces_from_an_eval_folder_without_the_teacher(toy_traces, tmp_path):
    # The inverse: traces from the eval folder's answers, without running the teacher (same file as generating).
    from tree_of_experts.commands.evaluate import traces

    d, toy, t = toy_traces
    out = str(tmp_path / "traces2.jsonl")
    t2 = traces(teacher=f"{toy}/teacher", data=FIXTURE, out=out, limit=4, max_new_tokens=12, keep_incorrect=True,
                from_eval=str(d / "acc-teacher"))
    assert open(out).read() == open(d / "traces.jsonl").read() and t2 == {**t, "out": out}
    bad = [(dict(limit=4, max_new_tokens=16, from_eval=str(d / "acc-teacher")), "max_new_tokens 12"),
           (dict(skip=4, limit=2, max_new_tokens=12, from_eval=str(d / "acc-teacher")), "skip/--limit"),
           (dict(limit=4, max_new_tokens=12, from_eval=str(tmp_path)), "no teacher answers")]
    for kw, message in bad:
        with pytest.raises(ToEError, match=message):
            traces(teacher=f"{toy}/teacher", data=FIXTURE, out=str(tmp_path / "x.jsonl"), **kw)
    assert not os.path.exists(tmp_path / "x.jsonl")


def test_ce_on_the_teachers_own_traces(toy_traces, tmp_path):
    # CE on the teacher's own traces: its greedy completions are the target, so the teacher scores lowest there.
    from tree_of_experts.commands.evaluate import evaluate

    d, toy, _ = toy_traces
    m = evaluate(base=f"{toy}/base", teacher=f"{toy}/teacher", task="gsm8k", data=str(d / "traces.jsonl"),
                 out=str(tmp_path / "ev-trace"), ce_target="trace", accuracy=False)
    assert m["systems"]["teacher"]["ce"] < m["systems"]["base"]["ce"]
    with pytest.raises(ToEError, match="toe traces"):
        evaluate(base=f"{toy}/base", task="gsm8k", data=FIXTURE, out=str(tmp_path / "x"), ce_target="trace")


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


def test_vote_majority_and_pass():
    from tree_of_experts.evaluation.scoring import vote

    def s(answer, ok):
        return {"extracted": answer, "correct": ok}

    assert vote([s("3", False), s("4", True), s("4", True)]) == {"majority": "4", "maj_correct": True, "pass": True}
    assert vote([s("3", False), s("4", True)])["majority"] == "3"  # a tie goes to the answer that came first
    assert vote([s(None, False), s(None, False), s("5", True)])["majority"] == "5"  # no answer abstains
    assert vote([s(None, False)]) == {"majority": None, "maj_correct": False, "pass": False}
    assert vote([s("3", False), s("3", False), s("4", True)]) == {"majority": "3", "maj_correct": False, "pass": True}


def test_sampling_options_are_checked_before_any_model_loads(tmp_path):
    from tree_of_experts.commands.evaluate import evaluate
    from tree_of_experts.commands.generate import generate

    fixture = os.path.join(os.path.dirname(__file__), "fixtures", "arith.jsonl")
    for kwargs, says in (({"num_samples": 4}, "pass --temperature > 0"), ({"temperature": -1.0}, "temperature=-1"),
                         ({"temperature": 0.7, "top_p": 0.0}, "top_p=0.0"),
                         ({"temperature": 0.7, "num_samples": 0}, "num_samples=0")):
        with pytest.raises(ToEError, match=says):
            evaluate(base=str(tmp_path / "no-base"), data=fixture, out=str(tmp_path / "ev"), **kwargs)
        with pytest.raises(ToEError, match=says):
            generate(base=str(tmp_path / "no-base"), prompt="x", **kwargs)


def test_sampled_eval_reports_maj_and_pass_at_k(tmp_path):
    from tree_of_experts.commands.evaluate import evaluate
    from tree_of_experts.commands.generate import generate
    from tree_of_experts.recipes.demo import toy_pair_dir

    toy = toy_pair_dir()  # trained toy base: it writes real answers
    fixture = os.path.join(os.path.dirname(__file__), "fixtures", "arith.jsonl")
    common = {"base": f"{toy}/base", "task": "gsm8k", "data": fixture, "limit": 6, "max_new_tokens": 12, "ce": False}

    def rows(folder):
        return [json.loads(line) for line in open(tmp_path / folder / "base.jsonl")]

    greedy = evaluate(out=str(tmp_path / "greedy"), **common)
    assert greedy["args"]["decoding"] == "greedy" and "sampling" not in greedy["args"]
    assert "samples" not in rows("greedy")[0] and "maj@1" not in greedy["systems"]["base"]
    from tree_of_experts import ToEModel
    from tree_of_experts.hf.loading import load_causal_lm

    ToEModel.fresh(load_causal_lm(f"{toy}/base"), layers=[1], num_leaves=4).save_pretrained(tmp_path / "plug")
    m = evaluate(out=str(tmp_path / "s0"), temperature=1.5, num_samples=4, seed=0, plugin=str(tmp_path / "plug"),
                 **common)
    assert m["args"]["decoding"] == "sample"
    toe = [json.loads(line) for line in open(tmp_path / "s0" / "toe.jsonl")]
    # Every system draws from the same seed: an untrained (identity) plug-in samples exactly what the base does.
    assert [r["samples"] for r in toe] == [r["samples"] for r in rows("s0")]
    assert m["args"]["sampling"] == {"temperature": 1.5, "top_p": 1.0, "num_samples": 4, "seed": 0}
    s = m["systems"]["base"]
    assert s["num_samples"] == 4 and {"maj@4", "maj@4_ci95", "pass@4", "pass@4_ci95", "pass@1"} <= set(s)
    sampled = rows("s0")
    assert all(len(r["samples"]) == 4 for r in sampled)
    assert all({"completion", "extracted", "correct", "tokens", "truncated"} <= set(x) for x in sampled[0]["samples"])
    assert all(r["completion"] == r["samples"][0]["completion"] for r in sampled)  # the row's answer: sample 0
    # The metrics are the rows' own counts.
    assert s["pass@4"] == sum(any(x["correct"] for x in r["samples"]) for r in sampled) / 6
    assert s["pass@1"] == sum(x["correct"] for r in sampled for x in r["samples"]) / 24
    assert s["maj@4"] == sum(r["maj_correct"] for r in sampled) / 6
    assert s["pass@4"] >= max(s["maj@4"], s["pass@1"])
    assert len({x["completion"] for r in sampled for x in r["samples"]}) > 6  # hot sampling really varies
    # Seeded: the same seed gives the same samples, another seed others.
    evaluate(out=str(tmp_path / "s0-again"), temperature=1.5, num_samples=4, seed=0, **common)
    assert rows("s0-again") == [{**r, "gen_seconds_total": rows("s0-again")[0]["gen_seconds_total"]}
                                for r in sampled]
    evaluate(out=str(tmp_path / "s1"), temperature=1.5, num_samples=4, seed=1, **common)
    assert [r["samples"] for r in rows("s1")] != [r["samples"] for r in sampled]
    # Sampling at a temperature near 0 is greedy decoding: every sample is the greedy completion.
    cold = evaluate(out=str(tmp_path / "cold"), temperature=1e-4, num_samples=2, **common)
    assert all(x["completion"] == g["completion"] for r, g in zip(rows("cold"), rows("greedy")) for x in r["samples"])
    assert cold["systems"]["base"]["maj@2"] == greedy["systems"]["base"]["accuracy"]
    # `toe generate` samples the same way: one row per sample, seeded.
    prompt = rows("greedy")[0]["prompt"]
    out = generate(base=f"{toy}/base", prompt=prompt, max_new_tokens=12, temperature=1.5, num_samples=3, seed=0)
    assert [r["sample"] for r in out] == [0, 1, 2] and out == generate(
        base=f"{toy}/base", prompt=prompt, max_new_tokens=12, temperature=1.5, num_samples=3, seed=0)
    assert generate(base=f"{toy}/base", prompt=prompt, max_new_tokens=12) == [
        {"prompt": prompt, "completion": rows("greedy")[0]["completion"]}]


def test_eval_counts_skipped_rows_and_ce_targets_cut_by_max_length(tmp_path):
    from tree_of_experts.commands.evaluate import evaluate
    from tree_of_experts.toy import tiny_qwen2, tiny_tokenizer

    tiny_qwen2(seed=0).save_pretrained(tmp_path / "base")
    tiny_tokenizer().save_pretrained(tmp_path / "base")
    fixture = os.path.join(os.path.dirname(__file__), "fixtures", "arith.jsonl")
    lines = open(fixture).readlines()[:4]
    data = tmp_path / "rows.jsonl"
    data.write_text(lines[0] + '{"question": "q", "answer": null}\n' + "".join(lines[1:]))
    common = {"base": str(tmp_path / "base"), "data": str(data), "accuracy": False}
    with pytest.raises(ToEError, match=f"{data}:2: field 'answer' is null"):
        evaluate(out=str(tmp_path / "x"), **common)
    m = evaluate(out=str(tmp_path / "ev"), skip_bad_rows=True, **common)
    assert m["args"]["skipped_rows"] == 1 and m["systems"]["base"]["n"] == 4
    assert m["systems"]["base"]["ce_cut_by_max_length"] == 0
    cut = evaluate(out=str(tmp_path / "cut"), skip_bad_rows=True, max_length=24, **common)
    assert cut["systems"]["base"]["ce_cut_by_max_length"] == 4  # prompts are 19 tokens, with their answers 30
    assert all(json.loads(r)["cut_by_max_length"] for r in open(tmp_path / "cut" / "base.jsonl"))
    with pytest.raises(ToEError, match=r"4 of 4 items have a prompt that fills max_length=12 tokens.*item 1\): "
                                       r"raise --max_length to at least 21 \(41 keeps"):
        evaluate(out=str(tmp_path / "x"), skip_bad_rows=True, max_length=12, **common)
    # Graded accuracy needs a gold answer per item: a GSM8K solution without '#### N' would be graded wrong whatever
    # the system answers, so it is refused up front (or left out and counted with --skip_bad_rows).
    data.write_text("".join(lines[:2]) + '{"question": "q", "answer": "no final number"}\n' + lines[2])
    graded = {**common, "accuracy": True, "ce": False, "max_new_tokens": 2}
    with pytest.raises(ToEError, match=r"1 of 4 items have no gold answer to grade \(the first is item 3; GSM8K "):
        evaluate(out=str(tmp_path / "x"), **graded)
    m = evaluate(out=str(tmp_path / "graded"), skip_bad_rows=True, **graded)
    assert m["args"]["skipped_rows"] == 1 and m["systems"]["base"]["n"] == 3


def test_code_task_scores_ce_on_plain_text_only(tmp_path):
    """`--task code`: CE of held-out text (what a plug-in costs outside its domain); accuracy is refused."""
    from tree_of_experts.commands.evaluate import evaluate
    from tree_of_experts.toy import tiny_qwen2, tiny_tokenizer

    tiny_qwen2(seed=0).save_pretrained(tmp_path / "base")
    tiny_tokenizer().save_pretrained(tmp_path / "base")
    data = tmp_path / "code.jsonl"
    data.write_text("".join(json.dumps({"prompt": "# f.py\n", "text": t}) + "\n"
                            for t in ("x = 3 plus 4", "y = 12 times 7 then")))
    m = evaluate(base=str(tmp_path / "base"), task="code", data=str(data), out=str(tmp_path / "ev"),
                 accuracy=False, ce_target="gold")
    assert m["systems"]["base"]["n"] == 2 and m["systems"]["base"]["ce"] > 0
    with pytest.raises(ToEError, match="--accuracy false"):
        evaluate(base=str(tmp_path / "base"), task="code", data=str(data), out=str(tmp_path / "ev2"))


class _Interrupt(Exception):
    pass


def _interrupt_after(monkeypatch, batches: int) -> list:
    """generate_texts (as `toe eval`/`toe traces` call it) raises after ``batches`` calls; returns the call log."""
    import tree_of_experts.evaluation.scoring as ev

    real, calls = ev.generate_texts, []

    def flaky(model, tok, prompts, *a, **kw):
        if len(calls) >= batches:
            raise _Interrupt
        calls.append(list(prompts))
        return real(model, tok, prompts, *a, **kw)

    monkeypatch.setattr(ev, "generate_texts", flaky)
    return calls


def test_traces_resume_after_an_interruption(tmp_path, monkeypatch):
    from tree_of_experts.commands.evaluate import traces
    from tree_of_experts.recipes.demo import toy_pair_dir

    toy, fixture = toy_pair_dir(), os.path.join(os.path.dirname(__file__), "fixtures", "arith.jsonl")
    kw = dict(teacher=f"{toy}/teacher", data=fixture, limit=6, batch_size=2, max_new_tokens=12, keep_incorrect=True)
    traces(out=str(tmp_path / "whole.jsonl"), **kw)
    out = str(tmp_path / "t.jsonl")
    calls = _interrupt_after(monkeypatch, 2)
    with pytest.raises(_Interrupt):
        traces(out=out, **kw)
    assert not os.path.exists(out) and os.path.exists(out + ".partial")
    with pytest.raises(ToEError, match="--resume true"):
        traces(out=out, **kw)  # the interrupted run is not replaced without being asked
    monkeypatch.undo()
    calls = _interrupt_after(monkeypatch, 99)
    traces(out=out, resume=True, **kw)
    assert len(calls) == 1  # only the third batch was generated again
    assert open(out).read() == open(tmp_path / "whole.jsonl").read()
    assert not os.path.exists(out + ".partial")


def test_eval_resume_after_an_interruption(tmp_path, monkeypatch):
    from tree_of_experts.commands.evaluate import evaluate
    from tree_of_experts.recipes.demo import toy_pair_dir

    toy, fixture = toy_pair_dir(), os.path.join(os.path.dirname(__file__), "fixtures", "arith.jsonl")
    kw = dict(base=f"{toy}/base", teacher=f"{toy}/teacher", data=fixture, limit=4, batch_size=2, max_new_tokens=12,
              ce=False)
    whole = evaluate(out=str(tmp_path / "whole"), **kw)
    out = str(tmp_path / "ev")
    _interrupt_after(monkeypatch, 3)  # the base's two batches and the teacher's first
    with pytest.raises(_Interrupt):
        evaluate(out=out, **kw)
    with pytest.raises(ToEError, match="--resume"):
        evaluate(out=out, **kw)
    monkeypatch.undo()
    calls = _interrupt_after(monkeypatch, 99)
    m = evaluate(out=out, resume=True, overwrite=True, **kw)  # --overwrite replaces the rest, the batches stay
    assert len(calls) == 1 and m["args"]["resumed_batches"] == {"base": 2, "teacher": 1}
    for system in ("base", "teacher"):
        assert m["systems"][system]["accuracy"] == whole["systems"][system]["accuracy"]
        assert [r["completion"] for r in map(json.loads, open(os.path.join(out, f"{system}.jsonl")))] == \
            [r["completion"] for r in map(json.loads, open(tmp_path / "whole" / f"{system}.jsonl"))]
    assert not os.path.exists(os.path.join(out, "generations.partial.jsonl"))
    with pytest.raises(ToEError, match=r"a finished eval run \(metrics.json\): nothing to resume"):
        evaluate(out=out, resume=True, **kw)  # a finished eval is not "continued"


def test_response_ce_from_the_scored_tail_equals_the_whole_sequence():
    # logits only from the position before the first target on: the same CE as every position's logits
    import torch

    from tree_of_experts.data import encode, pad_left
    from tree_of_experts.evaluation.scoring import response_ce
    from tree_of_experts.evaluation.tasks import Item
    from tree_of_experts.hf.layers import padded_inputs
    from tree_of_experts.losses import token_nll
    from tree_of_experts.toy import tiny_qwen2, tiny_tokenizer

    tok, model = tiny_tokenizer(), tiny_qwen2(hidden_size=32, num_layers=2, seed=0)
    items = [Item("", "Question: 3 plus 4, and then 12 more?\nAnswer: ", "19", "19"),
             Item("", "Q: 2?\nA: ", "two and then some", ""), Item("", "Question: 5?\nAnswer: ", "5", "5")]
    got = response_ce(model, tok, items, batch_size=3, max_length=64)
    chunk = [encode(tok, it.ce_prompt, it.ce_target, 64) for it in items]
    ids, am = pad_left([c.input_ids for c in chunk], tok.pad_token_id)
    mask = pad_left([c.loss_mask.long() for c in chunk], 0)[0].bool()
    with torch.no_grad():
        nll = token_nll(model(**padded_inputs(ids, am, "cpu")).logits, ids, mask)
    want = [float(nll[i].sum()) / int(mask[i].sum()) for i in range(3)]
    assert [n for _, n, _ in got] == [int(m.sum()) for m in mask]
    assert [ce for ce, _, _ in got] == pytest.approx(want, rel=1e-5)
