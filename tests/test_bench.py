from __future__ import annotations

import pytest
import torch

from tree_of_experts import ToEModel
from tree_of_experts.bench import bench
from tree_of_experts.toy import tiny_qwen2, tiny_tokenizer


@pytest.mark.parametrize("selection", ["topk", "topp", "dense", "beam"])
def test_no_graph_breaks_inside_the_injection(selection):
    """torch.compile can fuse the whole plug-in computation: dynamo finds no graph break in it."""
    model = ToEModel.fresh(tiny_qwen2(), layers=[0], num_leaves=16, top_k=4)
    block = model.plugin.blocks["0"]
    explained = torch._dynamo.explain(lambda h, m: block(h, m, selection)[0])(torch.randn(2, 5, 32), torch.ones(2, 5))
    assert explained.graph_break_count == 0, explained.break_reasons


def test_bench_runs_and_reports_ratios(tmp_path):
    tiny_qwen2().save_pretrained(tmp_path / "base")
    tiny_tokenizer().save_pretrained(tmp_path / "base")
    r = bench(base=str(tmp_path / "base"), out=str(tmp_path / "b"), batches=[2], reps=1, new_tokens=4,
              prompt_len=8, routing_exponents=[4, 6], routing_tokens=8, routing_reps=1)
    assert r["generation"]["batch_2"]["decode_ratio"]["median"] > 0
    assert [row["num_leaves"] for row in r["routing"]["rows"]] == [16, 64]
    assert (tmp_path / "b" / "bench.json").exists() and (tmp_path / "b" / "bench.png").exists()
    assert "decode speed ToE/base" in r["summary"]
