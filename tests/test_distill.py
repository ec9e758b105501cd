"""On-policy distillation: the divergence against hand-computed values, sampling, and `toe train --objective
on_policy` end to end (trains, resumes bit-exactly, mixes with off-policy steps by its ratio)."""

from __future__ import annotations

import json
import math
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

import tree_of_experts.training.loop as loop_mod  # the training loop every trained system runs
from tree_of_experts.commands.train import train
from tree_of_experts.config import ToEError
from tree_of_experts.toy import tiny_qwen2, tiny_tokenizer
from tree_of_experts.training.distill import OnPolicy, is_on_policy, prompt_ids, sample

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "arith.jsonl")


def test_sample_is_seeded_and_masks_what_follows_the_first_eos():
    tok = tiny_tokenizer()
    model = tiny_qwen2(hidden_size=32, num_layers=2, seed=0)
    prompts = [torch.tensor(tok("Question: 3 plus 4?")["input_ids"]), torch.tensor(tok("Question: 12?")["input_ids"])]
    settings = OnPolicy(max_new_tokens=12)
    a = sample(model, prompts, tok.pad_token_id, [tok.eos_token_id], settings, 7, "cpu")
    b = sample(model, prompts, tok.pad_token_id, [tok.eos_token_id], settings, 7, "cpu")
    c = sample(model, prompts, tok.pad_token_id, [tok.eos_token_id], settings, 8, "cpu")
    assert torch.equal(a["input_ids"], b["input_ids"]) and not torch.equal(a["input_ids"], c["input_ids"])
    plen = max(len(p) for p in prompts)
    assert not a["loss_mask"][:, :plen].any() and a["loss_mask"][:, plen].all()  # the first sampled token counts
    # Declare the third token row 0 sampled an EOS (also the pad id, as Qwen's tokenizer has it): the same seed
    # draws the same tokens up to it, row 0 keeps it and masks the rest, row 1 runs on unless it meets that token.
    stop = int(a["input_ids"][0, plen + 2])
    c = sample(model, prompts, stop, [stop], settings, 7, "cpu")
    for row, am, lm, old in zip(c["input_ids"], c["attention_mask"], c["loss_mask"], a["input_ids"]):
        gen, keep = row[plen:], lm[plen:]
        eos = (old[plen:] == stop).nonzero()
        n_keep = int(eos[0]) + 1 if len(eos) else len(gen)
        assert keep.tolist() == [True] * n_keep + [False] * (len(gen) - n_keep)
        assert torch.equal(am[plen:].bool(), keep) and torch.equal(gen[:n_keep], old[plen : plen + n_keep])
        assert torch.all(gen[n_keep:] == stop)  # padded after the end
    assert c["loss_mask"][0, plen:].sum() == 3


def test_prompt_ids_and_the_per_step_draw():
    ids, mask = torch.arange(6), torch.tensor([0, 0, 0, 1, 1, 1], dtype=torch.bool)
    assert prompt_ids(ids, mask).tolist() == [0, 1, 2]
    draws = [is_on_policy(0.5, 3, s) for s in range(200)]
    assert draws == [is_on_policy(0.5, 3, s) for s in range(200)] and 60 < sum(draws) < 140
    assert all(is_on_policy(1.0, 0, s) for s in range(5)) and not any(is_on_policy(0.0, 0, s) for s in range(5))
    with pytest.raises(ToEError, match="beta"):
        OnPolicy(beta=1.5)


def args(experts, out, **kw):
    return {"base": str(experts / "base"), "experts": str(experts / "ex"), "data": FIXTURE, "out": str(out),
            "max_steps": 6, "stage_a_steps": 2, "batch_size": 4, "log_every": 1, "save_every": 2,
            "objective": "on_policy", "sample_max_new_tokens": 8, **kw}


def test_on_policy_gradient_alone_moves_the_plugin(experts, tmp_path):
    """No warm-up, no route or usage terms, every step on-policy: whatever moves the plug-in is the JSD's gradient."""
    kw = dict(on_policy_ratio=1.0, skip_stage_a=True, route_weight=0.0, usage_weight=0.0, max_steps=3)
    train(**args(experts, tmp_path / "moved", lr=1e-2, bank_lr=1e-2, scale_lr=1e-2, **kw))
    train(**args(experts, tmp_path / "still", lr=0.0, bank_lr=0.0, scale_lr=0.0, **kw))
    moved, still = (load_file(tmp_path / d / "toe_model.safetensors") for d in ("moved", "still"))
    for group in ("gate.", "bank.", "scale"):
        assert any(not torch.equal(moved[k], still[k]) for k in moved if group in k), group


def test_on_policy_training_logs_samples(experts, tmp_path):
    summary = train(**args(experts, tmp_path / "p", on_policy_ratio=0.5, lr=1e-2, bank_lr=1e-2))
    rows = [json.loads(r) for r in open(tmp_path / "p" / "metrics.jsonl")]
    b = [r for r in rows if r["stage"] != "A"]
    want = ["on_policy" if is_on_policy(0.5, 0, s) else "off_policy" for s in range(6)]
    assert [r["objective"] for r in b] == want and len(set(want)) == 2
    for r in b:
        assert (r["jsd"] is None) == (r["objective"] == "off_policy") and math.isfinite(r["loss"])
    assert b[-1]["samples"] == 4 * want.count("on_policy")
    # running totals on every row: the last row alone gives the run's, whatever log_every drops
    assert b[-1]["on_policy_steps"] == want.count("on_policy")
    assert b[-1]["sample_tokens_total"] == sum(r["sample_tokens"] for r in b) > 0
    after, before = load_file(tmp_path / "p" / "toe_model.safetensors"), load_file(experts / "ex" / "toe_model.safetensors")
    assert any(not torch.equal(after[k], before[k]) for k in after if "gate" in k)
    assert summary["steps"] == 8


def test_the_totals_count_every_step_whatever_is_logged_and_the_table_reads_them(experts, tmp_path, monkeypatch):
    """log_every 3: the rows logged skip steps, the totals on the last one do not; a checkpoint written before the
    totals were kept gets them back from the schedule (on-policy steps) and the logged rows (tokens)."""
    from types import SimpleNamespace

    from tree_of_experts.evaluation.study_table import training_facts

    kw = dict(on_policy_ratio=0.5, log_every=3)
    train(**args(experts, tmp_path / "every1", on_policy_ratio=0.5))  # the same run, every step logged
    train(**args(experts, tmp_path / "p", **kw))
    every = [json.loads(r) for r in open(tmp_path / "every1" / "metrics.jsonl")]
    rows = [json.loads(r) for r in open(tmp_path / "p" / "metrics.jsonl")]
    want = {"on_policy_steps": sum(r.get("objective") == "on_policy" for r in every),
            "sample_tokens_total": sum(r.get("sample_tokens") or 0 for r in every)}
    assert len(rows) < len(every) and {k: rows[-1][k] for k in want} == want
    assert sum(r.get("objective") == "on_policy" for r in rows) < want["on_policy_steps"]  # what summing logged rows gave
    row = SimpleNamespace(labels=lambda: ["p"])
    (tmp_path / "study" / "train").mkdir(parents=True)
    shutil.copytree(tmp_path / "p", tmp_path / "study" / "train" / "p")
    facts = training_facts(SimpleNamespace(out=str(tmp_path / "study")), row)
    assert (facts["on_policy_steps"], facts["sampled_tokens"]) == tuple(want.values())
    # a checkpoint from before the totals: the on-policy steps come back from the schedule
    real_save = loop_mod.save_checkpoint
    monkeypatch.setattr(loop_mod, "save_checkpoint", lambda out, w, o, state, what: real_save(
        out, w, o, {k: v for k, v in state.items() if k != "totals"}, what=what))
    from test_train import crash_after

    monkeypatch.setattr(loop_mod, "save_checkpoint", crash_after(6, loop_mod.save_checkpoint))
    with pytest.raises(KeyboardInterrupt):
        train(**args(experts, tmp_path / "old", on_policy_ratio=0.5))
    monkeypatch.setattr(loop_mod, "save_checkpoint", real_save)
    train(**args(experts, tmp_path / "old", on_policy_ratio=0.5, resume=True))
    last = json.loads(open(tmp_path / "old" / "metrics.jsonl").readlines()[-1])
    assert {k: last[k] for k in want} == want


def test_on_policy_resume_equals_uninterrupted(experts, tmp_path, monkeypatch):
    from test_train import crash_after

    train(**args(experts, tmp_path / "full"))
    real_save = loop_mod.save_checkpoint
    monkeypatch.setattr(loop_mod, "save_checkpoint", crash_after(6, real_save))
    with pytest.raises(KeyboardInterrupt):
        train(**args(experts, tmp_path / "resumed"))
    monkeypatch.setattr(loop_mod, "save_checkpoint", real_save)
    train(**args(experts, tmp_path / "resumed", resume=True))
    a, b = load_file(tmp_path / "full" / "toe_model.safetensors"), load_file(tmp_path / "resumed" / "toe_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    last = [json.loads(open(tmp_path / d / "metrics.jsonl").readlines()[-1]) for d in ("full", "resumed")]
    totals = [{k: r[k] for k in ("on_policy_steps", "sample_tokens_total")} for r in last]
    assert totals[0] == totals[1]  # the totals come back with the checkpoint


def test_on_policy_refuses_a_teacher_with_another_vocabulary(experts, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    other = tmp_path / "other"
    tiny_qwen2(hidden_size=32, num_layers=2, seed=3).save_pretrained(other)
    inner = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>"))
    inner.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=inner, unk_token="<unk>", eos_token="<unk>").save_pretrained(other)
    with pytest.raises(ToEError, match="vocabulary"):
        train(**args(experts, tmp_path / "p", teacher=str(other)))


def test_lora_trains_with_the_same_objective_code(experts, tmp_path):
    """`toe baseline lora --objective on_policy`: same sampling schedule and divergence as `toe train`."""
    from tree_of_experts.recipes.baseline import baseline

    summary = baseline(kind="lora", base=str(experts / "base"), data=FIXTURE, out=str(tmp_path / "lora"),
                       experts=str(experts / "ex"), lora_rank=2, max_steps=3, batch_size=4, log_every=1,
                       objective="on_policy", on_policy_ratio=0.5, sample_max_new_tokens=6, kd_weight=1.0)
    rows = [json.loads(r) for r in open(tmp_path / "lora" / "metrics.jsonl")]
    want = ["on_policy" if is_on_policy(0.5, 0, s) else "off_policy" for s in range(3)]
    assert [r["objective"] for r in rows] == want and summary["objective"] == "on_policy"
    for r in rows:
        assert (r["jsd"] is None) == (r["objective"] == "off_policy")
        assert (r["kd"] is None) == (r["objective"] == "on_policy")  # off-policy steps distil the cached top-k
    adapter = load_file(tmp_path / "lora" / "adapter_model.safetensors")
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)  # B starts at 0: it trained
    card = (tmp_path / "lora" / "README.md").read_text()  # ours, not peft's empty template
    assert "More Information Needed" not in card and "| rank / alpha / dropout | 2 / 4 / 0.0" in card
    assert "generalized JSD beta 0.5" in card and "PeftModel.from_pretrained" in card
    # Both students start as the bare base (LoRA's B = 0, the plug-in's scale 0) and draw with the same seeds: the
    # first step samples the same tokens and scores them with the same divergence, so its loss is the same.
    # An all-on-policy LoRA run reads nothing of an extraction: the teacher is named, no --experts.
    baseline(kind="lora", base=str(experts / "base"), data=FIXTURE, out=str(tmp_path / "lora1"),
             teacher=str(experts / "teacher"), lora_rank=2, max_steps=1, batch_size=4, objective="on_policy",
             sample_max_new_tokens=6)
    train(**args(experts, tmp_path / "toe", scale_init=0.0, skip_stage_a=True, route_weight=0.0, usage_weight=0.0,
                 sample_max_new_tokens=6, max_steps=1))
    lora_row, toe_row = (json.loads(open(tmp_path / d / "metrics.jsonl").readline()) for d in ("lora1", "toe"))
    assert toe_row["sample_tokens"] == lora_row["sample_tokens"] > 0
    assert toe_row["jsd"] == pytest.approx(lora_row["jsd"], rel=1e-5) and toe_row["jsd"] > 0
    with pytest.raises(ToEError, match="control"):
        baseline(kind="control", base=str(experts / "base"), data=FIXTURE, out=str(tmp_path / "c"),
                 experts=str(experts / "ex"), objective="on_policy")


def test_toe_on_top_of_lora_is_a_system_of_its_own(experts, tmp_path):
    """`toe train --base_adapter LORA`: the plug-in trains on the LoRA-adapted base, keeps a copy of the adapter and
    merges it whenever it is loaded, so evaluating the folder scores base + LoRA + ToE."""
    from tree_of_experts import ToEModel
    from tree_of_experts.recipes.baseline import baseline

    baseline(kind="lora", base=str(experts / "base"), data=FIXTURE, out=str(tmp_path / "lora"), lora_rank=2,
             max_steps=2, batch_size=4, lr=5e-2)
    out = tmp_path / "both"
    off_policy = {k: v for k, v in args(experts, out).items() if k != "sample_max_new_tokens"}
    train(**{**off_policy, "objective": "off_policy", "base_adapter": str(tmp_path / "lora")})
    assert (out / "base_adapter" / "adapter_config.json").exists()
    ids = torch.tensor([[3, 5, 7, 9, 11]])
    both = ToEModel.from_pretrained(str(experts / "base"), out)
    assert both.toe_config.base_adapter == "base_adapter"
    from tree_of_experts.commands.hub import inspect

    assert inspect(str(out))["base_adapter"] == os.path.join(str(out), "base_adapter")  # shown, not hidden
    assert inspect(str(experts / "ex"))["base_adapter"] is None
    with torch.no_grad():
        logits = both(input_ids=ids).logits
        with both.disabled():
            adapted = both.base(input_ids=ids).logits  # base + LoRA, plug-in off
    bare = ToEModel.from_pretrained(str(experts / "base"), experts / "ex").base
    with torch.no_grad():
        plain = bare(input_ids=ids).logits
    assert not torch.allclose(adapted, plain)  # the adapter is merged
    assert not torch.allclose(logits, adapted)  # and the plug-in adds to it
    with ToEModel.from_pretrained(bare, out) as on_loaded:  # a caller's loaded base: merged into a copy
        with torch.no_grad():
            assert torch.allclose(on_loaded(input_ids=ids).logits, logits, atol=1e-5)
    with torch.no_grad():
        assert torch.equal(bare(input_ids=ids).logits, plain)  # the caller's base is still the bare base


def test_toe_model_takes_transformers_checkpointing_calls_and_keeps_the_base_in_eval_mode():
    """Trainer and trl call `activation_checkpointing_enable` (5.x) or `gradient_checkpointing_enable` (4.x) on the
    model they train: the base's decoder layers recompute while the model trains, never drop out, and stop
    recomputing when it is turned off."""
    from tree_of_experts import ToEModel
    from tree_of_experts.hf.layers import decoder_layers, is_checkpointing

    model = ToEModel.fresh(tiny_qwen2(hidden_size=32, num_layers=2, seed=0), layers=[1], num_leaves=4)
    assert model.supports_gradient_checkpointing
    model.gradient_checkpointing_enable()
    model.train()
    layers = decoder_layers(model.base)
    assert is_checkpointing(model.base) and all(layer.training for layer in layers)
    assert not any(m.training for layer in layers for m in layer.modules() if m is not layer)  # no dropout
    model.eval()
    assert not any(layer.training for layer in layers)
    model.train()
    model.activation_checkpointing_disable()
    assert not is_checkpointing(model.base) and not any(layer.training for layer in layers) and model.training


def test_on_policy_teacher_is_resolved_before_anything_is_written(experts, tmp_path):
    from tree_of_experts.recipes.baseline import baseline

    # the teacher is the base itself (what a no-teacher control's extraction records): refused, not a silent no-op
    with pytest.raises(ToEError, match="is the base itself"):
        train(**args(experts, tmp_path / "self", teacher=str(experts / "base")))
    # no extraction to name one and no --teacher: the message says so
    with pytest.raises(ToEError, match="no --experts extraction names one"):
        baseline(kind="lora", base=str(experts / "base"), data=FIXTURE, out=str(tmp_path / "lora"), lora_rank=2,
                 objective="on_policy")
    assert not (tmp_path / "self").exists() and not (tmp_path / "lora").exists()
