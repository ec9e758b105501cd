from __future__ import annotations

import json

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

    from tree_of_experts.lm_eval import ToELM

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
