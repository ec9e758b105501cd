from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import PLUGIN_CASES, randomize

from tree_of_experts import ToEError, ToEModel
from tree_of_experts.plugin import injection_mask
from tree_of_experts.toy import tiny_qwen2

CASES = PLUGIN_CASES


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def greedy(model, batch, n=6):
    return model.generate(**batch, max_new_tokens=n, do_sample=False, pad_token_id=0)


@pytest.mark.parametrize("fields", CASES)
def test_identity_at_init_prefill_and_cached_decode(base, batch, fields):
    ref_logits, ref_tokens = logits(base, batch), greedy(base, batch)
    model = ToEModel.fresh(base, **fields)
    assert torch.equal(logits(model, batch), ref_logits)
    assert torch.equal(greedy(model, batch), ref_tokens)


@pytest.mark.parametrize("fields", CASES)
def test_trained_plugin_changes_output_and_detach_restores_exactly(base, batch, fields):
    ref = logits(base, batch)
    model = randomize(ToEModel.fresh(base, **fields))
    assert not torch.allclose(logits(model, batch), ref)
    with model.disabled():
        assert torch.equal(logits(model, batch), ref)
    assert not torch.allclose(logits(model, batch), ref)  # re-attached after the block
    model.detach()
    assert torch.equal(logits(model, batch), ref)


@pytest.mark.parametrize("padded", [True, False])
@pytest.mark.parametrize("fields", CASES)
def test_cached_decode_equals_full_forward(base, batch, single, fields, padded):
    batch = batch if padded else single
    model = randomize(ToEModel.fresh(base, **fields))
    out = greedy(model, batch, n=5)
    mask = torch.cat([batch["attention_mask"], torch.ones(out.shape[0], 5, dtype=torch.long)], 1)
    full = logits(model, {"input_ids": out, "attention_mask": mask})
    # Greedy decoding with the cache must pick the argmax of the uncached forward at every new position.
    prompt_len = batch["input_ids"].shape[1]
    assert torch.equal(full[:, prompt_len - 1 : -1].argmax(-1), out[:, prompt_len:])
    # And the cached step logits equal the full forward's at the same positions.
    with torch.no_grad():
        step = model.generate(**batch, max_new_tokens=5, do_sample=False, pad_token_id=0,
                              output_logits=True, return_dict_in_generate=True).logits
    torch.testing.assert_close(torch.stack(step, 1), full[:, prompt_len - 1 : -1], rtol=1e-4, atol=1e-4)


def test_left_padding_gives_the_same_result_as_no_padding(base, tok):
    model = randomize(ToEModel.fresh(base, layers=[0], num_leaves=8))
    short = "Question: 3 plus 4?"
    alone = tok([short], return_tensors="pt")
    padded = tok([short, "Question: what is 12 times 7 then? so"], return_tensors="pt", padding=True)
    n = alone["input_ids"].shape[1]
    torch.testing.assert_close(logits(model, padded)[0, -n:], logits(model, alone)[0], rtol=1e-4, atol=1e-4)


def test_no_injection_at_first_token_or_padding(base, batch):
    model = randomize(ToEModel.fresh(base, layers=[0], num_leaves=8))
    mask = injection_mask(2, batch["input_ids"].shape[1], torch.device("cpu"), batch["attention_mask"], 0)
    am = batch["attention_mask"]
    first = am.argmax(-1)
    assert mask[0, first[0]] == 0 and mask[1, first[1]] == 0
    assert (mask[am == 0] == 0).all() and mask.sum() == am.sum() - 2

    def layer0_output() -> torch.Tensor:
        seen = []
        handle = model.base.model.layers[0].register_forward_hook(lambda m, a, o: seen.append(o) and None)
        with torch.no_grad():
            model.base(**batch)
        handle.remove()
        return seen[0][0] if isinstance(seen[0], tuple) else seen[0]

    h_toe = layer0_output()
    model.detach()
    changed = (h_toe - layer0_output()).abs().sum(-1) > 0
    assert torch.equal(changed, mask.bool())


def test_norm_clip_bounds_the_update(base, batch):
    model = randomize(ToEModel.fresh(base, layers=[0], num_leaves=8, clip=0.1), scale=100.0)
    block = model.plugin.blocks["0"]
    h = torch.randn(2, 7, 32)
    delta, _ = block(h, torch.ones(2, 7))
    assert (delta.norm(dim=-1) <= 0.1 * h.norm(dim=-1) * (1 + 1e-5)).all()


@pytest.mark.parametrize("convention", ["tuple", "tensor"])
def test_hook_accepts_both_decoder_output_conventions(base, convention):
    model = randomize(ToEModel.fresh(base, layers=[0], num_leaves=8))
    hook = model.plugin._layer_hook(0)
    h = torch.randn(1, 5, 32)
    model.plugin._mask = torch.ones(1, 5)
    output = (h, "attn") if convention == "tuple" else h
    result = hook(None, (), output)
    if convention == "tuple":
        assert isinstance(result, tuple) and result[1] == "attn"
        result = result[0]
    assert result.shape == h.shape and not torch.equal(result, h)


def test_gradients_reach_every_plugin_parameter_and_none_reach_the_base(base, batch):
    model = randomize(ToEModel.fresh(base, layers=[0, 1], num_leaves=8, intensity=True))
    model.plugin.config  # noqa: B018
    out = model(**batch, labels=batch["input_ids"])
    out.loss.backward()
    for name, p in model.plugin.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(p.grad is None and not p.requires_grad for p in model.base.parameters())


def test_save_load_round_trip_reproduces_logits(base, batch, tmp_path):
    model = randomize(ToEModel.fresh(base, layers=[0, 1], num_leaves=8, shape="deep", selection="topp", top_k=8))
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["README.md", "toe_config.json", "toe_model.safetensors"]
    loaded = ToEModel.from_pretrained(tiny_qwen2(seed=0), tmp_path)
    assert torch.equal(logits(loaded, batch), logits(model, batch))
    config = json.loads((tmp_path / "toe_config.json").read_text())
    for key in ("format_version", "base_model", "base_config_hash", "layers", "shape", "num_leaves", "top_k",
                "hidden_size", "versions", "teacher_model"):
        assert key in config


def test_wrong_base_is_refused_naming_the_mismatch(base, tmp_path):
    ToEModel.fresh(base, layers=[0], num_leaves=4).save_pretrained(tmp_path)
    with pytest.raises(ToEError, match="hidden_size: plug-in 32 vs base 48"):
        ToEModel.from_pretrained(tiny_qwen2(hidden_size=48), tmp_path)
    with pytest.raises(ToEError, match="num_hidden_layers"):
        ToEModel.from_pretrained(tiny_qwen2(num_layers=3), tmp_path)


def test_corrupted_and_mismatched_artifacts_give_clear_errors(base, tmp_path):
    ToEModel.fresh(base, layers=[0], num_leaves=4).save_pretrained(tmp_path)
    weights = tmp_path / "toe_model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])
    with pytest.raises(ToEError, match="corrupted"):
        ToEModel.from_pretrained(base, tmp_path)
    weights.write_bytes(good)
    config = json.loads((tmp_path / "toe_config.json").read_text())
    (tmp_path / "toe_config.json").write_text(json.dumps({**config, "num_leaves": 8}))
    with pytest.raises(ToEError, match="different plug-ins"):
        ToEModel.from_pretrained(base, tmp_path)
    (tmp_path / "toe_config.json").write_text("{not json")
    with pytest.raises(ToEError, match="not valid JSON"):
        ToEModel.from_pretrained(base, tmp_path)
    with pytest.raises(ToEError, match="not found"):
        ToEModel.from_pretrained(base, tmp_path / "nowhere")


@pytest.mark.parametrize("backend", ["eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_plugin_generates_what_the_eager_one_does(backend):
    """ToEPlugin.compile: same logits at prefill and decode shapes, same greedy tokens through generate."""
    torch.manual_seed(0)
    model = ToEModel.fresh(tiny_qwen2(), layers=[1], num_leaves=16, top_k=4)
    with torch.no_grad():
        model.plugin.blocks["1"].scale.fill_(0.5)
    ids = torch.randint(5, 60, (2, 7))
    am = torch.ones_like(ids)
    eager_logits = model(input_ids=ids, attention_mask=am).logits
    eager = model.generate(input_ids=ids, attention_mask=am, max_new_tokens=5, do_sample=False, pad_token_id=0)
    torch._dynamo.reset()
    model.plugin.compile(backend=backend)
    torch.testing.assert_close(model(input_ids=ids, attention_mask=am).logits, eager_logits, rtol=1e-4, atol=1e-4)
    compiled = model.generate(input_ids=ids, attention_mask=am, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(compiled, eager)


def test_routing_override_sweeps_k_at_inference_and_restores_the_config(base, batch):
    """selection(top_k=N) mixes every leaf with its tree probability, which is dense routing; K=1 differs; the
    configured K comes back on exit, and bad values are one-line errors."""
    model = randomize(ToEModel.fresh(base, layers=[0], num_leaves=8, selection="topk", top_k=2))
    configured = logits(model, batch)
    with model.selection("dense"):
        dense = logits(model, batch)
    with model.selection(top_k=8):
        torch.testing.assert_close(logits(model, batch), dense, rtol=1e-5, atol=1e-5)
    with model.selection(top_k=1):
        assert not torch.allclose(logits(model, batch), configured)
    assert torch.equal(logits(model, batch), configured)
    for bad in (dict(top_k=0), dict(top_p=1.5), dict(mode="sparse")):
        with pytest.raises(ToEError, match="must be|unknown"), model.selection(**bad):
            pass


def test_inspect_reports_how_much_of_the_bank_is_one_shared_vector(tmp_path, capsys):
    """`toe inspect`: a bank of one repeated vector has common_share 1 (routing cannot matter), random leaves ~1/N;
    the injected geometry is zero at the no-op init; a missing folder is a one-line error."""
    from tree_of_experts.bank import geometry
    from tree_of_experts.cli import main

    torch.manual_seed(0)
    same = geometry(torch.ones(8, 64))
    assert same["common_share"] == pytest.approx(1.0) and same["spread"] == pytest.approx(0.0, abs=1e-6)
    assert geometry(torch.randn(256, 64))["common_share"] < 0.05
    assert geometry(torch.zeros(4, 8))["common_share"] is None
    model = ToEModel.fresh(tiny_qwen2(), layers=[1], num_leaves=8)
    model.save_pretrained(tmp_path / "p")
    assert main(["inspect", "--plugin", str(tmp_path / "p")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["num_leaves"] == 8 and out["parameters"] == sum(p.numel() for p in model.plugin.parameters())
    assert out["banks"]["1"]["injected"]["common_share"] is None  # zero scale: nothing is injected yet
    assert 0 < out["banks"]["1"]["bank"]["common_share"] < 1
    assert main(["inspect", "--plugin", str(tmp_path / "nothing")]) == 2
    assert "not found" in capsys.readouterr().err


def test_counting_reports_the_mean_push_of_each_layer(base, batch):
    """`counting()` leaves each layer's mean ||Δ||/||h|| over the injected tokens in `delta_ratio`: 0 for a fresh
    (zero-scale) plug-in, and the recorded per-forward ratio for one forward of a trained one."""
    model = ToEModel.fresh(base, layers=[0, 1], num_leaves=4)
    with torch.no_grad(), model.plugin.counting():
        model(**batch)
    assert model.plugin.delta_ratio == {0: 0.0, 1: 0.0}
    with torch.no_grad():
        for block in model.plugin.blocks.values():
            block.scale.fill_(3.0)
        with model.plugin.counting(), model.plugin.recording() as records:
            model(**batch)
    for layer in (0, 1):
        assert model.plugin.delta_ratio[layer] == pytest.approx(records[layer].delta_ratio.item(), rel=1e-5)
        assert 0 < model.plugin.delta_ratio[layer] <= model.toe_config.clip + 1e-5  # the norm clip bounds it


def test_the_bank_sees_a_fused_optimizer_step_between_no_grad_forwards():
    """torch's fused AdamW (transformers' default optimizer) updates parameters without bumping their versions: a
    no-grad forward after a step (a trainer's on-policy sampling, an evaluation) must still read the stepped bank."""
    from tree_of_experts.bank import ExpertBank

    bank = ExpertBank(torch.randn(4, 8))
    opt = torch.optim.AdamW(bank.parameters(), lr=0.1, fused=True)
    with torch.no_grad():
        before = bank.vectors().clone()
    bank.vectors().sum().backward()
    opt.step()
    assert bank.direction._version == 0  # the premise: the step left no trace in the version
    with torch.no_grad():
        after = bank.vectors()
        assert not torch.equal(after, before) and torch.equal(after, bank._vectors())
        assert bank.vectors() is after  # reused until the next change
