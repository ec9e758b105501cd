"""The GPU path: the same code in bf16/fp16 on CUDA (the plug-in, capture, off- and on-policy training, sampling,
eval, the real-shape bench). Skipped without a CUDA device; `runs/gpu_check.sh` runs them on one GPU."""

from __future__ import annotations

import json
import os

import pytest
import torch

from conftest import randomize, save_tiny_pair
from tree_of_experts import ToEModel
from tree_of_experts.toy import tiny_qwen2

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "arith.jsonl")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_plugin_on_cuda_starts_as_a_no_op_and_changes_the_output_once_trained(dtype, batch):
    base = tiny_qwen2(hidden_size=32, num_layers=2, seed=0).to("cuda", dtype)
    model = ToEModel.fresh(base, layers=[0, 1], num_leaves=8, top_k=2)
    inputs = {k: v.cuda() for k, v in batch.items()}
    with model.disabled():
        ref = base(**inputs).logits
    assert torch.equal(model(**inputs).logits, ref)  # zero-init scale: bit-exact to the base in half precision too
    randomize(model)
    out = model(**inputs).logits
    assert out.dtype == dtype and torch.isfinite(out).all() and not torch.equal(out, ref)
    with model.disabled():
        assert torch.equal(base(**inputs).logits, ref)  # detaching restores the base exactly


def test_cached_decode_equals_the_full_forward_on_cuda(single):
    base = tiny_qwen2(hidden_size=32, num_layers=2, seed=0).cuda()
    model = randomize(ToEModel.fresh(base, layers=[1], num_leaves=8, top_k=2))
    ids = single["input_ids"].cuda()
    cached = model.generate(input_ids=ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    full = ids
    for _ in range(8):  # greedy by full forwards, no cache
        full = torch.cat([full, model(input_ids=full).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(cached, full)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_extract_train_and_eval_run_on_cuda_in_half_precision(dtype, tmp_path):
    from tree_of_experts.commands.evaluate import evaluate
    from tree_of_experts.commands.extract import extract
    from tree_of_experts.commands.train import train

    save_tiny_pair(tmp_path)
    base, teacher = str(tmp_path / "base"), str(tmp_path / "teacher")
    extract(teacher=teacher, base=base, data=FIXTURE, out=str(tmp_path / "ex"), num_leaves=8, shard_size=8,
            heldout_frac=0.25, batch_size=4, gate_rank=8, dtype=dtype)
    common = dict(base=base, experts=str(tmp_path / "ex"), data=FIXTURE, max_steps=4, stage_a_steps=2,
                  batch_size=4, log_every=1, save_every=2, dtype=dtype)
    off = train(**common, out=str(tmp_path / "off"), cached_states=True)
    on = train(**common, out=str(tmp_path / "on"), objective="on_policy", teacher=teacher,
               sample_max_new_tokens=8)
    for run in ("off", "on"):
        rows = [json.loads(r) for r in open(tmp_path / run / "metrics.jsonl")]
        assert rows and all(r["loss"] == r["loss"] for r in rows)  # finite, logged every step
    assert off["kd"]
    assert any(json.loads(r).get("objective") == "on_policy" for r in open(tmp_path / "on" / "metrics.jsonl"))
    evaluate(base=base, plugin=str(tmp_path / "on"), data=FIXTURE, out=str(tmp_path / "eval"), limit=4,
             max_new_tokens=8, batch_size=2, dtype=dtype)
    systems = json.load(open(tmp_path / "eval" / "metrics.json"))["systems"]
    assert set(systems) == {"base", "toe"} and all(0 < s["ce"] < 100 for s in systems.values())  # finite, scored


def test_the_shape_bench_runs_on_cuda(tmp_path):
    from tree_of_experts.commands.bench import bench

    base = tiny_qwen2(hidden_size=64, num_layers=4, seed=0).config
    teacher = tiny_qwen2(hidden_size=96, num_layers=4, seed=1).config
    base.save_pretrained(tmp_path / "b")
    teacher.save_pretrained(tmp_path / "t")
    r = bench(shapes=f"{tmp_path / 'b'}:{tmp_path / 't'}", out=str(tmp_path / "bench"), reps=1, batches=[2],
              new_tokens=4, prompt_len=8, routing_exponents=[6], routing_reps=1, extract_length=16,
              train_length=16, dtype="bfloat16")
    assert r["device"].startswith("cuda") and r["shapes"]["base_layers"] == [4, 4]  # the real depth on a GPU
    assert r["extraction"]["bytes_per_token"] == r["extraction"]["bytes_per_token_formula"]
    assert all(v["gpu_bytes"] > 0 for v in r["peak_memory"].values())


def test_state_targets_are_computed_on_the_training_device(experts):
    """With --state_loss_weight on a GPU, a batch's targets h⁰ + δ are computed on the device (the fusion map is
    cheap there, not on the host) and equal the CPU's up to float rounding; a state-loss run trains on CUDA."""
    from tree_of_experts.data import DataSpec
    from tree_of_experts.hf.loading import load_tokenizer
    from tree_of_experts.training.examples import load_examples

    tok = load_tokenizer(str(experts / "base"))
    rows = {dev: load_examples(FIXTURE, DataSpec().for_tokenizer(tok), tok, 512, None, str(experts / "ex"), False,
                               with_targets=True, device=dev)[0] for dev in ("cpu", "cuda")}
    cpu, gpu = rows["cpu"][0].loaded(), rows["cuda"][0].loaded()
    assert rows["cuda"][0].ref.device == "cuda" and gpu.target.device.type == "cpu"  # batches are built on the host
    assert torch.allclose(cpu.target.float(), gpu.target.float(), atol=1e-2) and torch.allclose(
        cpu.target_norm2, gpu.target_norm2, rtol=1e-3, atol=1e-4)
