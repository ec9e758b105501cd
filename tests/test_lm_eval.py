from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval", reason="lm-eval is part of the test extra: pip install -e '.[test]'")

from tree_of_experts import ToEModel  # noqa: E402
from tree_of_experts.toy import tiny_qwen2, tiny_tokenizer  # noqa: E402

TASK = """task: toe_tiny
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
"""


def test_lm_eval_scores_base_plus_plugin_on_a_local_task(tmp_path):
    import lm_eval
    from lm_eval.tasks import TaskManager

    from tree_of_experts.harness import ToELM

    tok = tiny_tokenizer()
    base = tiny_qwen2(seed=0)
    base.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    model = ToEModel.fresh(base, layers=[0], num_leaves=4)
    with torch.no_grad():
        model.plugin.blocks["0"].scale.fill_(5.0)  # a plug-in that visibly changes the scores
    model.save_pretrained(tmp_path / "plug")
    rows = [{"question": f"what is {a} plus {b}?", "choices": [str(a + b), str(a + b + 1)], "label": 0}
            for a, b in [(1, 2), (3, 4), (5, 1), (2, 2), (6, 3), (7, 1)]]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "toe_tiny.yaml").write_text(TASK.format(data=tmp_path / "data.jsonl"))
    tm = TaskManager(include_path=str(tmp_path / "tasks"))

    def run(lm):
        out = lm_eval.simple_evaluate(model=lm, tasks=["toe_tiny"], task_manager=tm, log_samples=True)
        return [s["resps"] for s in out["samples"]["toe_tiny"]]

    from lm_eval.models.huggingface import HFLM

    bare = run(HFLM(pretrained=str(tmp_path / "base"), tokenizer=tok, device="cpu", batch_size=2))
    with_toe = run(ToELM(pretrained=str(tmp_path / "base"), plugin=str(tmp_path / "plug"), tokenizer=tok,
                         device="cpu", batch_size=2))
    assert len(bare) == len(with_toe) == 6
    assert bare != with_toe  # the plug-in really is in the loop


FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "lm_eval")


def test_toe_lm_eval_cli_runs_lm_evals_own_cli_with_model_toe(tmp_path, monkeypatch):
    """`toe lm-eval --model toe --model_args base=...,plugin=...` on a local task (fixture yaml + jsonl): the
    scores are those of ToELM with the right tokenizer, loaded by toe's own loader."""
    import glob

    import lm_eval
    from lm_eval.tasks import TaskManager
    from transformers import AutoTokenizer

    from tree_of_experts.cli import main
    from tree_of_experts.hf.loading import load_tokenizer
    from tree_of_experts.harness import ToELM

    tok = tiny_tokenizer()
    tiny_qwen2(seed=0).save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    model = ToEModel.fresh(tiny_qwen2(seed=0), layers=[0], num_leaves=4)
    with torch.no_grad():
        model.plugin.blocks["0"].scale.fill_(5.0)
    model.save_pretrained(tmp_path / "plug")
    base, plug = str(tmp_path / "base"), str(tmp_path / "plug")
    monkeypatch.chdir(FIXTURES)  # the task's data_files path is relative
    assert main(["lm-eval", "--model", "toe", "--model_args", f"base={base},plugin={plug}", "--tasks", "toe_tiny",
                 "--include_path", FIXTURES, "--device", "cpu", "--batch_size", "2", "--output_path",
                 str(tmp_path / "out"), "--log_samples"]) == 0
    (samples_file,) = glob.glob(str(tmp_path / "out" / "**" / "samples_toe_tiny_*.jsonl"), recursive=True)
    cli_samples = sorted((json.loads(line) for line in Path(samples_file).read_text().splitlines()),
                         key=lambda s: s["doc_id"])
    (results_file,) = glob.glob(str(tmp_path / "out" / "**" / "results_*.json"), recursive=True)
    assert "acc,none" in json.loads(Path(results_file).read_text())["results"]["toe_tiny"]

    # The same numbers through the Python API with the tokenizer passed in by hand.
    lm = ToELM(base=base, plugin=plug, tokenizer=load_tokenizer(base), device="cpu", batch_size=2)
    out = lm_eval.simple_evaluate(model=lm, tasks=["toe_tiny"], task_manager=TaskManager(include_path=FIXTURES),
                                  log_samples=True)
    api_resps = [s["resps"] for s in sorted(out["samples"]["toe_tiny"], key=lambda s: s["doc_id"])]
    assert len(cli_samples) == len(api_resps) == 6
    for c, a in zip((s["resps"] for s in cli_samples), api_resps):
        assert [float(x[0][0]) for x in c] == pytest.approx([float(x[0][0]) for x in a], abs=1e-5)
    # Why toe's loader: AutoTokenizer (what lm-eval's HFLM uses) picks another class and other ids for this pair.
    default = ToELM(base=base, plugin=plug, device="cpu", batch_size=2).tokenizer
    text = "Question: what is 1 plus 2?\nAnswer: 3"
    assert default(text)["input_ids"] == tok(text)["input_ids"]
    assert AutoTokenizer.from_pretrained(base)(text)["input_ids"] != tok(text)["input_ids"]


def test_toe_lm_eval_model_args_errors_are_one_line(tmp_path, capsys):
    from tree_of_experts.cli import main

    assert main(["lm-eval", "--model", "toe", "--model_args", f"base={tmp_path}", "--tasks", "toe_tiny",
                 "--include_path", FIXTURES]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("toe: error: the toe model needs a plug-in: --model_args base=MODEL,plugin=FOLDER (or --model "
                       "hf for the bare base)")
