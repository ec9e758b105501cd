from __future__ import annotations

import pytest
import torch
from conftest import save_tiny_pair

from tree_of_experts import ToEError, ToEModel
from tree_of_experts.commands.bench import bench
from tree_of_experts.toy import tiny_qwen2


@pytest.mark.parametrize("selection", ["topk", "topp", "dense", "beam"])
def test_no_graph_breaks_inside_the_injection(selection):
    """torch.compile can fuse the whole plug-in computation: dynamo finds no graph break in it."""
    model = ToEModel.fresh(tiny_qwen2(), layers=[0], num_leaves=16, top_k=4)
    block = model.plugin.blocks["0"]
    explained = torch._dynamo.explain(lambda h, m: block(h, m, selection)[0])(torch.randn(2, 5, 32), torch.ones(2, 5))
    assert explained.graph_break_count == 0, explained.break_reasons


def test_bench_runs_and_reports_ratios(tmp_path):
    save_tiny_pair(tmp_path)
    r = bench(base=str(tmp_path / "base"), teacher=str(tmp_path / "teacher"), out=str(tmp_path / "b"), batches=[2],
              reps=2, new_tokens=4, prompt_len=8, routing_exponents=[4, 6], routing_tokens=8, routing_reps=1,
              extract_batch=2, extract_length=16, train_batch=2, train_length=16)
    g = r["generation"]["batch_2"]
    for stats in (g["decode_ratio"], r["training"]["ratio"], r["extraction"]["ratio"]):  # 2 interleaved repetitions
        assert stats["n"] == 2 and stats["min"] <= stats["median"] <= stats["max"]
    assert g["step"]["base_step_us"] > 0 and g["step"]["plugin_us"] > 0 and 0 < g["step"]["implied_ratio"] < 1
    assert [row["num_leaves"] for row in r["routing"]["rows"]] == [16, 64]
    assert all((tmp_path / "b" / f).exists() for f in ("bench.json", "bench.png", "bench.md"))
    assert "decode speed ToE/base" in r["summary"] and "extraction capture" in r["summary"]
    assert r["training"]["base_params_with_grad"] == 0  # only the plug-in trains (the LoRA step runs on a copy)
    assert r["training"]["toe_over_lora"]["n"] == 2 and r["training"]["lora_rank"] == 8
    assert "LoRA r8 step" in r["summary"]
    low = r["training"]["cached_layer"]
    assert r["training"]["cached_over_full"]["n"] == 2 and f"from cached states at layer {low}" in r["summary"]
    assert f"from cached states at layer {low}" in (tmp_path / "b" / "bench.md").read_text()


def test_bench_runs_only_the_parts_asked_for(tmp_path):
    save_tiny_pair(tmp_path)
    r = bench(base=str(tmp_path / "base"), teacher=str(tmp_path / "teacher"), out=str(tmp_path / "b"),
              parts=["extraction"], reps=2, extract_batch=2, extract_length=16)
    assert "extraction" in r and not {"generation", "routing", "training"} & set(r)
    a = r["extraction"]["account"]  # where capture's time goes, as shares of it
    assert 0 < a["teacher_share"] < 1 and 0 < a["base_share"] < 1 and a["teacher_share"] + a["base_share"] <= 1 + 1e-9
    assert r["summary"].startswith("extraction capture") and (tmp_path / "b" / "bench.md").exists()
    with pytest.raises(ToEError, match="--parts"):
        bench(base=str(tmp_path / "base"), out=str(tmp_path / "c"), parts=["decode"])
    with pytest.raises(ToEError, match="--teacher"):  # asked for by name, the extraction timing needs the teacher
        bench(base=str(tmp_path / "base"), out=str(tmp_path / "c"), parts=["extraction"])
    before = (tmp_path / "b" / "bench.json").read_text()
    with pytest.raises(ToEError, match="--overwrite true"):  # an earlier run's numbers are not replaced silently
        bench(base=str(tmp_path / "base"), out=str(tmp_path / "b"), parts=["routing"], routing_exponents=[4])
    assert (tmp_path / "b" / "bench.json").read_text() == before
    r = bench(base=str(tmp_path / "base"), out=str(tmp_path / "b"), parts=["routing"], routing_exponents=[4],
              routing_tokens=8, routing_reps=1, overwrite=True)
    import json

    assert "routing" in r and json.loads((tmp_path / "b" / "bench.json").read_text())["parts"] == ["routing"]


def test_the_shape_bench_builds_real_configs_at_a_cut_depth_and_measures_what_the_formula_says(tmp_path):
    from tree_of_experts.shapes import capture_bytes_per_token, injection_layers, shape_config, shipped_shapes

    assert {"qwen2.5-1.5b", "deepseek-r1-distill-qwen-7b"} <= set(shipped_shapes())
    assert shape_config("deepseek-r1-distill-qwen-7b").hidden_size == 3584
    tiny_qwen2(hidden_size=32, num_layers=4, seed=0).config.save_pretrained(tmp_path / "b")
    tiny_qwen2(hidden_size=48, num_layers=6, seed=1).config.save_pretrained(tmp_path / "t")
    r = bench(shapes=f"{tmp_path / 'b'}:{tmp_path / 't' / 'config.json'}", shape_layers=3, out=str(tmp_path / "o"),
              batches=[2], reps=1, new_tokens=3, prompt_len=6, routing_exponents=[4], routing_tokens=8,
              routing_reps=1, extract_batch=2, extract_length=12, train_batch=2, train_length=12, lora_rank=0)
    assert r["shapes"]["base_layers"] == [3, 4] and r["shapes"]["teacher_layers"] == [3, 6]
    assert r["shapes"]["injection_layers"] == injection_layers(3) == [0, 1]
    e = r["extraction"]
    assert e["bytes_per_token"] == e["bytes_per_token_formula"] == capture_bytes_per_token([32] * 2, [48] * 2, 32)
    o = r["on_policy"]
    assert o["sampled_tokens"] == 6 and o["step_s"]["median"] >= o["update_s"]["median"] > 0
    assert set(r["peak_memory"]) == set(r["parts"]) and "on-policy step" in r["summary"]
    assert "3 of 4 layers" in (tmp_path / "o" / "bench.md").read_text()


def test_the_shape_bench_refuses_bad_shapes_before_building_anything(tmp_path):
    for kw, match in ((dict(shapes="qwen2.5-1.5b"), "BASE:TEACHER"), (dict(shapes="nope:qwen2.5-1.5b"), "shipped"),
                      (dict(shapes="qwen2.5-1.5b:qwen2.5-3b", base="x"), "drop --base"), ({}, "--shapes")):
        with pytest.raises(ToEError, match=match):
            bench(out=str(tmp_path / "o"), **kw)
    assert not (tmp_path / "o").exists()


def test_bank_scale_runs_only_when_named_and_compares_mapped_with_in_ram(tmp_path):
    save_tiny_pair(tmp_path)
    r = bench(base=str(tmp_path / "base"), out=str(tmp_path / "a"), parts=["routing"], routing_exponents=[4])
    assert "bank_scale" not in r
    r = bench(base=str(tmp_path / "base"), out=str(tmp_path / "b"), parts=["bank_scale"], bank_exponents=[6, 12],
              reps=1, new_tokens=3, prompt_len=4)
    rows = r["bank_scale"]["rows"]
    assert [row["num_leaves"] for row in rows] == [64, 4096]
    big = rows[-1]
    assert big["file_bytes"] >= big["bank_bytes"] + big["gate_node_bytes"] > 0
    if big["mapped"]["resident_after_load"] is not None:  # Linux: the mapped load reads no bank row
        in_ram = big["in_ram"]["resident_after_load"]
        assert sum(big["mapped"]["resident_after_load"].values()) < 0.5 * sum(in_ram.values())
    assert "mapped load" in r["summary"] and "| 2^12 |" in (tmp_path / "b" / "bench.md").read_text()
