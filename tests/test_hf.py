"""tree_of_experts.hf: reading and starting a forward at decoder layers (hooks, both output conventions), stopping
early, gradient checkpointing of the frozen layers, and the base's weight fingerprint."""

from __future__ import annotations

import torch

from tree_of_experts.toy import tiny_qwen2, tiny_tokenizer
from tree_of_experts.training.distill import OnPolicy, sample


def test_a_forward_started_from_cached_states_equals_the_full_forward():
    from tree_of_experts import ToEModel
    from tree_of_experts.hf.layers import capture_layers, decoder_layers, padded_inputs, starting_at

    base = tiny_qwen2(hidden_size=32, num_layers=3, seed=0)
    ids = torch.tensor([[0, 0, 5, 6, 7, 8], [3, 4, 5, 6, 7, 8]])
    am = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    inputs = padded_inputs(ids, am, "cpu")
    with torch.no_grad(), capture_layers(base, [1]) as seen:
        full = base(**inputs).logits
    calls = []  # layer 0 on the batch (the one-token probe of the layers' output convention aside)
    decoder_layers(base)[0].mlp.register_forward_hook(lambda m, a, o: calls.append(0) if a[0].shape[1] > 1 else None)
    with torch.no_grad(), starting_at(base, 1, seen[1]):
        cached = base(**inputs).logits
    assert not calls and torch.allclose(cached, full, atol=1e-6)  # layer 0 did not run, the logits are the same
    with torch.no_grad():
        again = base(**inputs).logits
    assert calls and torch.equal(again, full)  # the layers are themselves again after the block
    # A plug-in at the starting layer adds its Δ to the cached states, as it does to the computed ones.
    model = ToEModel.fresh(base, layers=[1, 2], num_leaves=4)
    with torch.no_grad():
        for block in model.plugin.blocks.values():
            block.scale.fill_(1.0)
        full = model(**inputs).logits
        with starting_at(base, 1, seen[1]):
            cached = model(**inputs).logits
    assert torch.allclose(cached, full, atol=1e-6) and not torch.allclose(full, again, atol=1e-3)


class _TupleLayer(torch.nn.Module):
    """A decoder layer with the transformers 4.x convention: it returns ``(hidden, attn_weights)``."""

    def __init__(self, seed: int):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)
        torch.nn.init.normal_(self.lin.weight, generator=torch.Generator().manual_seed(seed))

    def forward(self, hidden_states, attention_mask=None):
        return hidden_states + torch.tanh(self.lin(hidden_states)), None


class _TupleLM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(16, 8)
        self.layers = torch.nn.ModuleList([_TupleLayer(i) for i in range(3)])

    def forward(self, input_ids, attention_mask=None):
        h = self.embed(input_ids)
        for layer in self.layers:
            h = layer(h, attention_mask=attention_mask)[0]
        return h


def test_starting_at_follows_the_layers_output_convention():
    from tree_of_experts.hf.layers import capture_layers, layers_return_tuples, starting_at

    lm, ids = _TupleLM(), torch.tensor([[1, 2, 3, 4]])
    assert layers_return_tuples(lm) is True
    assert layers_return_tuples(tiny_qwen2(hidden_size=32, num_layers=2, seed=0)) is False  # transformers 5.x
    with torch.no_grad(), capture_layers(lm, [1]) as seen:
        full = lm(ids)
    with torch.no_grad(), starting_at(lm, 1, seen[1]):
        cached = lm(ids)
    assert torch.equal(cached, full)
    own = lm.layers[0].forward = lambda *a, **k: (a[0], None)  # an instance forward (accelerate's wrappers) returns
    with starting_at(lm, 1, seen[1]):
        pass
    assert lm.layers[0].forward is own and "forward" not in lm.layers[1].__dict__


def test_states_until_stops_early_with_the_same_states():
    from tree_of_experts.hf.layers import capture_layers, states_until

    model = tiny_qwen2(num_layers=4).eval()
    batch = dict(tiny_tokenizer()(["what is 3 plus 4?"], return_tensors="pt"))
    calls = []
    handle = model.model.layers[3].register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad(), capture_layers(model, [0, 1]) as full:
        model(**batch)
    with torch.no_grad():
        early = states_until(model, [1, 0], batch)
    handle.remove()
    assert len(calls) == 1  # the top layer ran for the full forward only
    assert all(torch.equal(full[i], early[i]) for i in (0, 1))


def test_weight_fingerprint_indices_stay_inside_large_tensors():
    """A real base's embedding has 136M values: evenly spaced sample indices must stay below that (a float32
    linspace rounded the last one up to the size itself and broke attaching to Qwen2.5-0.5B)."""
    from tree_of_experts.hf.loading import sample_indices

    for n in (1, 7, 2**24 + 1, 136134656, 151936 * 1536):
        idx = sample_indices(n, 8)
        assert idx.min() == 0 and idx.max() == n - 1 and len(idx) == 8


def test_checkpointing_a_frozen_base_recomputes_and_sampling_keeps_it():
    """`toe train --gradient_checkpointing true`: the frozen base stays in eval mode, yet its decoder layers are
    recomputed in backward (each runs twice per step) with the same gradients; an on-policy sample in between
    leaves that set-up as it found it."""
    from tree_of_experts import ToEModel
    from tree_of_experts.hf.layers import checkpoint_frozen_layers, decoder_layers

    tok = tiny_tokenizer()
    ids = torch.tensor([tok("Question: 3 plus 4 is 7 and 12 times 7")["input_ids"]])

    def grads(checkpoint: bool) -> tuple[list[torch.Tensor], int]:
        model = ToEModel.fresh(tiny_qwen2(hidden_size=32, num_layers=2, seed=0), layers=[0], num_leaves=4)
        with torch.no_grad():
            model.plugin.blocks["0"].scale.fill_(1.0)
        if checkpoint:
            checkpoint_frozen_layers(model.base)
            sample(model, [ids[0, :4]], tok.pad_token_id, [tok.eos_token_id], OnPolicy(max_new_tokens=3), 0, "cpu")
        calls = []
        # a hook inside the layer (a layer's own hooks stay outside transformers' checkpoint by design)
        decoder_layers(model.base)[1].mlp.register_forward_pre_hook(lambda *a: calls.append(1))
        model(input_ids=ids).logits.float().pow(2).mean().backward()
        return [p.grad.clone() for p in model.trainable_parameters() if p.grad is not None], len(calls)

    (plain, n_plain), (ckpt, n_ckpt) = grads(False), grads(True)
    assert n_plain == 1 and n_ckpt == 2  # recomputed in backward
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain, ckpt)) and len(plain) == len(ckpt) > 0


def test_checkpointing_runs_no_backward_below_the_first_injection_layer():
    """transformers 5.x makes the input embeddings' output require a gradient when checkpointing is enabled (for
    reentrant checkpoints of adapters); with the plug-in at layer 1 alone (it edits that layer's output) that would
    recompute and backpropagate the frozen layers 0 and 1 for nothing. Non-reentrant, only layer 2 runs again;
    reentrant (asked for) keeps the hook, without which it would drop the plug-in's gradients."""
    from tree_of_experts import ToEModel
    from tree_of_experts.hf.layers import checkpoint_frozen_layers, decoder_layers

    ids = torch.tensor([tiny_tokenizer()("Question: 3 plus 4 is 7 and 12 times 7")["input_ids"]])

    def calls_per_layer(kwargs: dict | None) -> tuple[list[int], torch.Tensor]:
        model = ToEModel.fresh(tiny_qwen2(hidden_size=32, num_layers=3, seed=0), layers=[1], num_leaves=4)
        with torch.no_grad():
            model.plugin.blocks["1"].scale.fill_(1.0)
        checkpoint_frozen_layers(model.base, kwargs)
        calls = [0, 0, 0]
        for i, layer in enumerate(decoder_layers(model.base)):
            layer.mlp.register_forward_pre_hook(lambda *a, i=i: calls.__setitem__(i, calls[i] + 1))
        model(input_ids=ids).logits.float().pow(2).mean().backward()
        return calls, model.plugin.blocks["1"].scale.grad

    calls, grad = calls_per_layer(None)
    assert calls == [1, 1, 2] and grad is not None and grad.abs().sum() > 0  # no backward through layers 0 and 1
    calls, grad_reentrant = calls_per_layer({"use_reentrant": True})
    assert calls == [2, 2, 2] and torch.allclose(grad, grad_reentrant, atol=1e-6)


def test_a_teacher_spread_by_a_device_map_gives_the_same_logits_and_is_fed_on_its_first_device(tmp_path, monkeypatch):
    """``load_causal_lm(device_map=...)`` dispatches with accelerate (here two layers offloaded to the disk, the
    CPU-only stand-in for a teacher over several GPUs); the on-policy teacher logits equal an in-memory teacher's
    and come back on the batch's device; the offload folder goes with the model."""
    import gc
    import json
    import os

    import pytest

    from tree_of_experts.errors import ToEError
    from tree_of_experts.hf.layers import input_device
    from tree_of_experts.hf.loading import load_causal_lm, parse_device_map
    from tree_of_experts.training.distill import teacher_logits

    tiny_qwen2(hidden_size=48, num_layers=3, seed=1).save_pretrained(tmp_path / "teacher")
    mapping = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
               "model.layers.1": "disk", "model.layers.2": "disk", "model.norm": "cpu", "lm_head": "cpu"}
    (tmp_path / "map.json").write_text(json.dumps(mapping))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    os.makedirs(tmp_path / "tmp")
    whole = load_causal_lm(str(tmp_path / "teacher"))
    spread = load_causal_lm(str(tmp_path / "teacher"), device_map=parse_device_map(str(tmp_path / "map.json")))
    assert any(p.device.type == "meta" for p in spread.parameters())  # offloaded: loaded layer by layer
    assert input_device(spread) == torch.device("cpu")
    batch = {"input_ids": torch.tensor([[0, 5, 6, 7], [3, 4, 5, 6]]), "attention_mask": torch.tensor([[0, 1, 1, 1],
                                                                                                     [1, 1, 1, 1]])}
    keep = torch.tensor([2, 3])
    with torch.no_grad():
        a, b = teacher_logits(whole, batch, keep), teacher_logits(spread, batch, keep)
    assert b.device == batch["input_ids"].device and torch.allclose(a, b, atol=1e-6)
    assert [d for d in os.listdir(tmp_path / "tmp") if d.startswith("toe-offload-")]  # the offloaded weights
    del spread
    gc.collect()
    assert not os.listdir(tmp_path / "tmp")
    assert parse_device_map("auto") == "auto" and parse_device_map(None) is None
    with pytest.raises(ToEError, match="give one of auto, balanced"):
        parse_device_map("gpu0")
