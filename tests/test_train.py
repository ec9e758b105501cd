from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import tree_of_experts.training.loop as loop_mod  # the training loop every trained system runs
from tree_of_experts.commands.train import train
from tree_of_experts.config import ToEError
from tree_of_experts.toy import tiny_qwen2

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "arith.jsonl")


def args(experts, out, **kw):
    return {"base": str(experts / "base"), "experts": str(experts / "ex"), "data": FIXTURE, "out": str(out),
            "max_steps": 12, "stage_a_steps": 6, "batch_size": 4, "log_every": 2, "save_every": 4, **kw}


def plugin_tensors(out):
    return load_file(os.path.join(out, "toe_model.safetensors"))


def test_loss_decreases_and_base_is_untouched(experts, tmp_path):
    base = tiny_qwen2(hidden_size=32, num_layers=2, seed=0)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    summary = train(**args(experts, tmp_path / "p", base=base, tokenizer=str(experts / "base"), max_steps=40,
                           lr=1e-2, scale_lr=5e-2, bank_lr=1e-2, stage_a_steps=20))
    rows = [json.loads(r) for r in open(tmp_path / "p" / "metrics.jsonl")]
    b = [r["ce"] for r in rows if r["stage"] == "B"]
    assert sum(b[-3:]) / 3 < b[0] - 0.05  # the plug-in lowers CE (the fixture's digits are learnable)
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())
    assert summary["kd"] and os.path.exists(tmp_path / "p" / "curves.png")
    assert summary["peak_rss_gib"] > 0  # what the run needed, for sizing the next one
    assert "route_acc_per_level" in rows[0] and len(rows[0]["route_acc_per_level"]) == 3


def test_stage_a_learns_the_route_labels(experts, tmp_path):
    from tree_of_experts import ToEModel
    from tree_of_experts.tree import path_labels, route_loss

    train(**args(experts, tmp_path / "p", max_steps=1, stage_a_steps=40, route_weight=0.0))
    route = load_file(str(experts / "ex" / "route_data.safetensors"))
    states, labels = route["states.0"].float()[None], path_labels("balanced", 8, route["leaf.0"])[None]

    def loss(folder):
        gate = ToEModel.from_pretrained(tiny_qwen2(hidden_size=32, num_layers=2, seed=0), folder).plugin.blocks["0"].gate
        with torch.no_grad():
            return route_loss(gate(states, "dense"), labels)[0].item()

    assert loss(tmp_path / "p") < loss(experts / "ex") - 0.02


def crash_after(step_to_crash: int, real_save):
    """A save_checkpoint that saves, then kills the run (KeyboardInterrupt) right after ``step_to_crash``."""

    def save(out, weights, opt, state, *a, **kw):
        real_save(out, weights, opt, state, *a, **kw)
        if state["step"] == step_to_crash:
            raise KeyboardInterrupt

    return save


def test_resume_equals_uninterrupted(experts, tmp_path, monkeypatch):
    train(**args(experts, tmp_path / "full"))
    real_save = loop_mod.save_checkpoint
    monkeypatch.setattr(loop_mod, "save_checkpoint", crash_after(8, real_save))
    with pytest.raises(KeyboardInterrupt):
        train(**args(experts, tmp_path / "resumed"))
    # as if killed between save_checkpoint's renames: the new checkpoint whole in checkpoint.tmp, none in place
    ck = tmp_path / "resumed" / "checkpoint"
    os.replace(ck, str(ck) + ".tmp")
    monkeypatch.setattr(loop_mod, "save_checkpoint", real_save)
    before = [r for r in open(tmp_path / "resumed" / "metrics.jsonl") if json.loads(r)["step"] <= 8]
    # --overwrite next to --resume replaces the rest of the folder, not the checkpoint: the run continues
    train(**args(experts, tmp_path / "resumed", resume=True, overwrite=True))
    assert open(tmp_path / "resumed" / "metrics.jsonl").readlines()[:len(before)] == before  # not run again
    a, b = plugin_tensors(tmp_path / "full"), plugin_tensors(tmp_path / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = lambda p: [json.loads(r)["step"] for r in open(p / "metrics.jsonl")]  # noqa: E731
    assert rows(tmp_path / "resumed") == rows(tmp_path / "full")


def test_plugin_baseline_resumes(experts, tmp_path, monkeypatch):
    """`toe baseline --resume` continues a killed flat run to the uninterrupted result."""
    from tree_of_experts.recipes.baseline import baseline

    kw = dict(kind="flat", base=str(experts / "base"), experts=str(experts / "ex"), data=FIXTURE, max_steps=4,
              stage_a_steps=2, batch_size=4, save_every=1)
    baseline(out=str(tmp_path / "full"), **kw)
    real_save = loop_mod.save_checkpoint
    monkeypatch.setattr(loop_mod, "save_checkpoint", crash_after(3, real_save))
    with pytest.raises(KeyboardInterrupt):
        baseline(out=str(tmp_path / "resumed"), **kw)
    from tree_of_experts.recipes.study_plan import resumes_at
    assert resumes_at(str(tmp_path / "resumed")) == (3, 6)  # what a study's plan reads: Stage A's 2 steps + 4
    monkeypatch.setattr(loop_mod, "save_checkpoint", real_save)
    baseline(out=str(tmp_path / "resumed"), resume=True, **kw)
    a, b = plugin_tensors(tmp_path / "full"), plugin_tensors(tmp_path / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_lora_baseline_resumes_on_policy_bit_exactly(experts, tmp_path, monkeypatch):
    """A killed on-policy LoRA run continues from its checkpoint (adapter tensors + optimizer) to the uninterrupted
    run's adapter, logs each step once, and removes the checkpoint once the adapter is saved."""
    import tree_of_experts.recipes.baseline as baseline_mod

    kw = dict(kind="lora", base=str(experts / "base"), experts=str(experts / "ex"), data=FIXTURE, lora_rank=2,
              max_steps=5, batch_size=4, save_every=2, log_every=1, lr=5e-2, objective="on_policy",
              on_policy_ratio=0.5, sample_max_new_tokens=6, kd_weight=1.0)
    baseline_mod.baseline(out=str(tmp_path / "full"), **kw)
    real_save = loop_mod.save_checkpoint
    monkeypatch.setattr(loop_mod, "save_checkpoint", crash_after(4, real_save))
    with pytest.raises(KeyboardInterrupt):
        baseline_mod.baseline(out=str(tmp_path / "resumed"), **kw)
    with open(tmp_path / "resumed" / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 1.0')  # a row cut by the kill, after the checkpoint
    monkeypatch.setattr(loop_mod, "save_checkpoint", real_save)
    with pytest.raises(ToEError, match="--resume"):  # the folder holds a run: continuing it is asked for
        baseline_mod.baseline(out=str(tmp_path / "resumed"), **kw)
    with pytest.raises(ToEError, match="lora_rank"):  # a resume repeats the run's arguments
        baseline_mod.baseline(out=str(tmp_path / "resumed"), resume=True, **{**kw, "lora_rank": 3})
    baseline_mod.baseline(out=str(tmp_path / "resumed"), resume=True, **kw)
    a, b = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("full", "resumed"))
    assert a.keys() == b.keys() and any(v.abs().sum() > 0 for k, v in a.items() if "lora_B" in k)
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = lambda d: [json.loads(r) for r in open(tmp_path / d / "metrics.jsonl")]  # noqa: E731
    assert [r["step"] for r in rows("resumed")] == [1, 2, 3, 4, 5]
    assert [r["loss"] for r in rows("resumed")] == [r["loss"] for r in rows("full")]
    assert rows("resumed")[-1]["samples"] == rows("full")[-1]["samples"] > 0
    assert not (tmp_path / "resumed" / "checkpoint").exists()


def test_ablation_flags_change_the_computation(experts, tmp_path):
    train(**args(experts, tmp_path / "frozen", freeze_bank=True, skip_stage_a=True))
    start = load_file(str(experts / "ex" / "toe_model.safetensors"))
    frozen = plugin_tensors(tmp_path / "frozen")
    bank_keys = [k for k in start if ".bank." in k]
    assert bank_keys and all(torch.equal(start[k], frozen[k]) for k in bank_keys)
    rows = [json.loads(r) for r in open(tmp_path / "frozen" / "metrics.jsonl")]
    assert all(r["stage"] != "A" for r in rows)
    train(**args(experts, tmp_path / "nokd", no_kd=True))
    assert all(r["kd"] is None for r in map(json.loads, open(tmp_path / "nokd" / "metrics.jsonl")) if r["stage"] != "A")
    # KD alone (no CE on the data): the plug-in moves towards the teacher's distribution.
    train(**args(experts, tmp_path / "kdonly", ce_weight=0.0, skip_stage_a=True, route_weight=0.0, usage_weight=0.0,
                 max_steps=20, log_every=1, lr=1e-2, scale_lr=5e-2, bank_lr=1e-2))
    rows = [json.loads(r) for r in open(tmp_path / "kdonly" / "metrics.jsonl")]
    assert all(r["loss"] == pytest.approx(r["kd"]) and r["ce"] > 0 for r in rows)  # CE is logged, not trained on
    assert sum(r["kd"] for r in rows[-3:]) < sum(r["kd"] for r in rows[:3])
    with pytest.raises(ToEError, match="ce_weight=0"):
        train(**args(experts, tmp_path / "nothing", ce_weight=0.0, no_kd=True))
    assert not (tmp_path / "nothing").exists()  # refused before anything was written


def test_two_processes_equal_one(experts, tmp_path):
    """Default settings (usage regulariser and route loss on): the usage is computed from all-reduced counts."""
    common = ["--base", str(experts / "base"), "--experts", str(experts / "ex"), "--data", FIXTURE,
              "--max_steps", "4", "--stage_a_steps", "2", "--batch_size", "4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "tree_of_experts.cli", "train", *common, "--out", str(tmp_path / "one")],
                   check=True, env=env, capture_output=True)
    # torchrun starts two CPU processes (gloo); `accelerate launch --cpu` would start only one.
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
                    "-m", "tree_of_experts.cli", "train", *common, "--out", str(tmp_path / "two")],
                   check=True, env=env, capture_output=True)
    assert json.load(open(tmp_path / "two" / "train_summary.json"))["processes"] == 2
    a, b = plugin_tensors(tmp_path / "one"), plugin_tensors(tmp_path / "two")
    start = load_file(str(experts / "ex" / "toe_model.safetensors"))
    assert not torch.equal(a["blocks.0.scale"], start["blocks.0.scale"])  # training moved the plug-in
    for k in a:  # per-process usage entropy (the old default) left 1.3e-4; all-reduced usage leaves float noise
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    logged = [[json.loads(r) for r in open(tmp_path / d / "metrics.jsonl")] for d in ("one", "two")]
    for r1, r2 in zip(*logged):  # rank 0 logs the global loss, not its half of the batch
        for key in ("loss", "ce", "kd", "usage"):
            if r1.get(key) is not None:
                assert r2[key] == pytest.approx(r1[key], rel=1e-4, abs=1e-6), (r1["step"], key)


@pytest.mark.parametrize("kind", ["static", "random", "flat", "lora"])
def test_baselines_train_and_load(experts, tmp_path, kind):
    from tree_of_experts import ToEModel
    from tree_of_experts.recipes.baseline import baseline

    warmup = {} if kind == "lora" else {"stage_a_steps": 2}  # an adapter has no route warm-up (refused)
    summary = baseline(kind=kind, base=str(experts / "base"), experts=str(experts / "ex"), data=FIXTURE,
                       out=str(tmp_path / kind), max_steps=3, batch_size=4, **warmup)
    base = tiny_qwen2(hidden_size=32, num_layers=2, seed=0)
    if kind == "lora":
        from peft import PeftModel

        PeftModel.from_pretrained(base, str(tmp_path / kind))
        per_rank = summary["trainable_params"] // summary["rank"]  # matched up to rounding of the rank
        assert abs(summary["trainable_params"] - summary["plugin_params"]) <= per_rank / 2 or summary["rank"] == 1
        return
    model = ToEModel.from_pretrained(base, tmp_path / kind)
    bank = model.plugin.blocks["0"].bank.vectors()
    if kind == "static":  # one vector for every leaf, kept frozen
        assert torch.allclose(bank, bank[0].expand_as(bank), atol=1e-6)
    if kind == "flat":
        assert model.toe_config.shape == "flat" and model.plugin.blocks["0"].gate.num_nodes == 8


def test_sft_and_fixed_rank_lora_need_no_extraction_and_evaluate(experts, tmp_path):
    from tree_of_experts.commands.evaluate import evaluate
    from tree_of_experts.config import ToEError
    from tree_of_experts.recipes.baseline import baseline

    base = str(experts / "base")
    with pytest.raises(ToEError, match="--lora_rank"):
        baseline(kind="lora", base=base, data=FIXTURE, out=str(tmp_path / "x"), max_steps=1)
    # distilling the cached top-k needs an extraction of this very data: refused before anything is written
    other = tmp_path / "other.jsonl"
    other.write_text(open(FIXTURE).read() + open(FIXTURE).readline())
    for kw in (dict(), dict(experts=str(experts / "ex"), data=str(other))):
        with pytest.raises(ToEError, match="no cached teacher top-k"):
            baseline(**{"kind": "lora", "base": base, "lora_rank": 2, "data": FIXTURE, "out": str(tmp_path / "kd"),
                        "max_steps": 1, "kd_weight": 1.0, **kw})
        assert not (tmp_path / "kd").exists()
    lora = baseline(kind="lora", base=base, lora_rank=2, data=FIXTURE, out=str(tmp_path / "lora"), max_steps=3,
                    batch_size=4, lr=1e-2)
    assert lora["rank"] == 2 and lora["plugin_params"] is None
    ckpt = baseline(kind="lora", base=base, lora_rank=2, data=FIXTURE, out=str(tmp_path / "lora-ckpt"), max_steps=3,
                    batch_size=4, lr=1e-2, gradient_checkpointing=True)  # recomputed activations, same gradients
    assert ckpt["metrics"]["loss"] == pytest.approx(lora["metrics"]["loss"], rel=1e-5)
    a, b = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("lora", "lora-ckpt"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    baseline(kind="sft", base=base, data=FIXTURE, out=str(tmp_path / "sft"), max_steps=3, batch_size=4, lr=1e-3)
    m = evaluate(base=base, lora=str(tmp_path / "lora"), sft=str(tmp_path / "sft"), task="gsm8k", data=FIXTURE,
                 out=str(tmp_path / "ev"), limit=4, accuracy=False)
    assert set(m["systems"]) == {"base", "lora", "sft"}
    # Both trained on this very data: each lowers its CE, so neither is silently the bare base.
    assert m["systems"]["sft"]["ce"] < m["systems"]["base"]["ce"]
    assert m["systems"]["lora"]["ce"] < m["systems"]["base"]["ce"]
    with pytest.raises(ToEError, match="nothing to evaluate"):
        evaluate(base=base, with_base=False, task="gsm8k", data=FIXTURE, out=str(tmp_path / "none"))


def test_report_to_logs_the_metrics_rows_to_tensorboard(experts, tmp_path):
    """`--report_to tensorboard`: accelerate's tracker gets every logged row (its event file holds the CE scalar)."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(**args(experts, tmp_path / "p", max_steps=4, stage_a_steps=2, report_to="tensorboard"))
    events = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "p" / "trackers") for f in fs if "tfevents" in f]
    assert events
    acc = EventAccumulator(os.path.dirname(events[0]))
    acc.Reload()
    rows = [json.loads(r) for r in open(tmp_path / "p" / "metrics.jsonl")]
    ce = [r["ce"] for r in rows if r["stage"] == "B"]
    logged = [e.value for e in acc.Scalars("ce")]
    assert logged == pytest.approx(ce, rel=1e-6) and (tmp_path / "p" / "curves.png").exists()


def test_a_checkpoint_before_the_first_logged_row_is_fine(experts, tmp_path):
    """save_every < log_every: the curves refreshed at a checkpoint wait for the first metrics row."""
    train(**args(experts, tmp_path / "p", max_steps=3, stage_a_steps=1, log_every=10, save_every=1))
    assert (tmp_path / "p" / "curves.png").exists()


def test_training_from_cached_states_gives_the_same_losses(experts, tmp_path):
    from tree_of_experts.hf.layers import decoder_layers

    def rounded_base():  # the full forward with the cache's fp16 rounding at the injection layer (layer 1)
        base = tiny_qwen2(hidden_size=32, num_layers=2, seed=0)
        decoder_layers(base)[1].register_forward_hook(lambda m, a, o: o.half().float())
        return base

    runs, layer0_calls = {}, {}
    for cached in (False, True):
        out, base, calls = tmp_path / f"cached-{cached}", rounded_base(), []
        decoder_layers(base)[0].mlp.register_forward_hook(  # on batches, not the one-token convention probe
            lambda m, a, o, calls=calls: calls.append(1) if a[0].shape[1] > 1 else None)
        train(**args(experts, out, base=base, tokenizer=str(experts / "base"), max_steps=4, stage_a_steps=2,
                     log_every=1, cached_states=cached, gradient_checkpointing=True))
        runs[cached], layer0_calls[cached] = [json.loads(r) for r in open(out / "metrics.jsonl")], len(calls)
    for full, cached in zip(runs[False], runs[True]):
        assert cached["loss"] == pytest.approx(full["loss"], rel=1e-4, abs=1e-6)
    assert [r["stage"] for r in runs[True]].count("B") == 4
    assert layer0_calls[True] == 0 < layer0_calls[False]  # the cached run never computed the layer below


def test_cached_states_are_refused_where_they_do_not_apply(experts, tmp_path):
    other = tmp_path / "other.jsonl"
    other.write_text(open(FIXTURE).read() + open(FIXTURE).readline())  # another file: other rows
    with pytest.raises(ToEError, match="extraction's own data"):
        train(**args(experts, tmp_path / "a", data=str(other), cached_states=True))
    with pytest.raises(ToEError, match="base_adapter"):
        train(**args(experts, tmp_path / "b", cached_states=True, base_adapter=str(tmp_path)))
    with pytest.raises(ToEError, match="tokenized otherwise"):
        train(**args(experts, tmp_path / "c", cached_states=True, max_length=24))
    with pytest.raises(ToEError, match="--dtype float32"):
        train(**args(experts, tmp_path / "d", cached_states=True, dtype="bfloat16"))
    assert not any((tmp_path / d).exists() for d in ("a", "b", "c", "d"))
    # An earlier run in the folder survives a refused --overwrite: every check comes before anything is removed.
    train(**args(experts, tmp_path / "kept", max_steps=1, stage_a_steps=1))
    before = sorted(os.listdir(tmp_path / "kept"))
    for bad in (dict(max_length=24), dict(dtype="bfloat16")):
        with pytest.raises(ToEError, match="--cached_states"):
            train(**args(experts, tmp_path / "kept", cached_states=True, overwrite=True, **bad))
    assert sorted(os.listdir(tmp_path / "kept")) == before


def test_the_control_trains_from_its_own_cached_states_and_lora_refuses_them(experts, tmp_path):
    from tree_of_experts.recipes.baseline import baseline

    kw = dict(base=str(experts / "base"), experts=str(experts / "ex"), data=FIXTURE, max_steps=2, stage_a_steps=1,
              batch_size=4, cached_states=True)
    summary = baseline(kind="control", out=str(tmp_path / "ctl"), **kw)
    assert summary["train"]["steps"] == 3 and json.load(open(tmp_path / "ctl" / "train_args.json"))["cached_states"]
    with pytest.raises(ToEError, match="every layer"):  # (an adapter has no route warm-up to give steps to)
        baseline(kind="lora", out=str(tmp_path / "lora"), **{k: v for k, v in kw.items() if k != "stage_a_steps"})
    assert not (tmp_path / "lora").exists()


def test_a_finished_adapter_run_is_not_resumed(experts, tmp_path):
    """`--resume` on a finished lora run refuses (its checkpoint is gone: resuming would retrain from step 0 and
    replace the adapter) and leaves the adapter as it was."""
    from tree_of_experts.recipes.baseline import baseline

    kw = dict(kind="lora", base=str(experts / "base"), data=FIXTURE, lora_rank=2, max_steps=2, batch_size=4,
              save_every=1, out=str(tmp_path / "lora"))
    baseline(**kw)
    before = (tmp_path / "lora" / "adapter_model.safetensors").read_bytes()
    with pytest.raises(ToEError, match="finished baseline run"):
        baseline(**kw, resume=True)
    assert (tmp_path / "lora" / "adapter_model.safetensors").read_bytes() == before


def test_runs_without_a_terminal_log_one_line_per_logged_step(experts, tmp_path, caplog):
    """Under nohup or a batch scheduler the progress bar is off: each logged step is one log line instead."""
    import logging

    from tree_of_experts.recipes.baseline import baseline

    with caplog.at_level(logging.INFO, logger="tree_of_experts"):
        train(**args(experts, tmp_path / "p", max_steps=2, stage_a_steps=2, log_every=1))
        baseline(kind="lora", base=str(experts / "base"), data=FIXTURE, lora_rank=2, max_steps=2, batch_size=4,
                 log_every=1, out=str(tmp_path / "lora"))
    lines = [r.getMessage() for r in caplog.records if r.name == "tree_of_experts.training.checkpoint"]
    assert [m.split(",")[0] for m in lines] == [f"toe train: step {s}/4" for s in (1, 2, 3, 4)] + [
        f"toe baseline: step {s}/2" for s in (1, 2)]
    assert "stage A" in lines[0] and "stage B" in lines[3] and " ce " in lines[3] and " ce " in lines[-1]


def test_flush_denormals_makes_subnormal_products_zero():
    """What the training loops and `toe` switch on: subnormal operands count as zero (a matmul over them would
    otherwise run many-fold slower on x86 CPUs); normal values are untouched."""
    from tree_of_experts.training.steps import flush_denormals

    flush_denormals()
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush subnormal floats")
    x = torch.tensor([1e-39, 1e-30, 0.5])
    assert (x * 1.0).tolist()[0] == 0.0 and (x * 1.0)[1:].tolist() == x[1:].tolist()


@pytest.mark.parametrize("kind", ["toe", "lora"])
def test_training_with_the_state_loss_starts_at_one_and_logs_it(experts, tmp_path, kind):
    """At init LoRA changes nothing, so the relative error to h⁰ + δ is 1 (up to the cache's fp16 rounding); the
    plug-in starts below 1 (its bank is built from δ and its scale starts at 1); trained on the state loss alone,
    each lowers it."""
    from tree_of_experts.recipes.baseline import baseline

    common = dict(base=str(experts / "base"), experts=str(experts / "ex"), data=FIXTURE, out=str(tmp_path / kind),
                  max_steps=12, batch_size=4, state_loss_weight=5.0)
    if kind == "toe":
        # the tiny pair's δ is ~1e-5 per coordinate (h ~0.02): Adam's steps must be smaller still
        train(**common, stage_a_steps=0, skip_stage_a=True, log_every=1, ce_weight=0.0, no_kd=True, lr=1e-7,
              scale_lr=1e-7, bank_lr=1e-7)
    else:
        baseline(kind="lora", lora_rank=4, lr=1e-6, log_every=1, **common)
    rows = [json.loads(r) for r in open(tmp_path / kind / "metrics.jsonl")]
    state = [r["state"] for r in rows if r.get("state") is not None]
    assert len(state) == 12 and min(state[-3:]) < state[0]
    # LoRA starts at 1 up to the fp16 cache's rounding, which on the tiny pair is of δ's own size (h ~0.02, δ ~1e-5;
    # on the real pair δ is ~3 % of h, 60× fp16's relative precision)
    assert abs(state[0] - 1.0) < 0.25 if kind == "lora" else 0 < state[0] < 1


def test_the_state_loss_is_refused_where_it_has_no_target(experts, tmp_path):
    other = tmp_path / "other.jsonl"
    other.write_text(open(FIXTURE).read().replace("plus", "and"))  # another file: the extraction cached nothing for it
    with pytest.raises(ToEError, match="state_loss_weight"):
        train(**args(experts, tmp_path / "p", data=str(other), state_loss_weight=1.0, no_kd=True))
    with pytest.raises(ToEError, match="state_loss_weight"):
        train(**args(experts, tmp_path / "q", state_loss_weight=-1.0))
    assert not (tmp_path / "p").exists() and not (tmp_path / "q").exists()
