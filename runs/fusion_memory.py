"""The fusion map's training-step activations, the build's largest memory term (docs/scale.md, "Peak RAM"):
what a Qwen2 decoder layer saves for the backward, per token, in units of the hidden width D and the MLP width I
(autograd's saved-tensor hooks, the weights' own storages left out, on random models of two widths and depths), and
the loss's peak over the vocabulary in a backward (the peak RSS a wide-vocabulary, one-layer step adds, in units of
B T V fp32 values). Runs in a minute on one CPU core; writes results/scale/fusion-memory.json.

    PYTHONPATH=src OMP_NUM_THREADS=1 python runs/fusion_memory.py
"""

from __future__ import annotations

import json
import os
import resource

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from tree_of_experts.losses import token_nll

OUT = "results/scale/fusion-memory.json"


def model(d: int, inter: int, layers: int, vocab: int) -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    cfg = Qwen2Config(hidden_size=d, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=d // 64,
                      num_key_value_heads=1, vocab_size=vocab, max_position_embeddings=512)
    m = Qwen2ForCausalLM(cfg).float()
    m.requires_grad_(False)  # frozen, as under the fusion map: only what flows to an injected input is saved
    return m


def saved_bytes_per_token(d: int, inter: int, layers: int, b: int = 2, t: int = 64) -> float:
    """Bytes autograd saves for the backward per token (a padded batch, the input made to need a gradient)."""
    m = model(d, inter, layers, 1000)
    weights = {p.untyped_storage().data_ptr() for p in m.parameters()}
    saved: dict[int, int] = {}

    def pack(x: torch.Tensor) -> torch.Tensor:
        s = x.untyped_storage()
        if s.data_ptr() not in weights:
            saved[s.data_ptr()] = s.nbytes()
        return x

    ids = torch.randint(0, 1000, (b, t))
    mask = torch.ones(b, t, dtype=torch.long)
    mask[0, :5] = 0
    emb = m.model.embed_tokens(ids).requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        m(inputs_embeds=emb, attention_mask=mask)
    return sum(saved.values()) / (b * t)


def loss_peak_in_v(vocab: int = 50_000, b: int = 4, t: int = 256) -> float:
    """The peak RSS a one-layer step over a wide vocabulary adds (after a warm-up at a quarter of the batch), in
    B T V fp32 values."""
    m = model(64, 128, 1, vocab)
    ids, keep = torch.randint(0, vocab, (b, t)), torch.ones(b, t, dtype=torch.bool)
    shift = torch.zeros(1, requires_grad=True)
    rows = 0
    for rows in (1, b):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        logits = m(inputs_embeds=m.model.embed_tokens(ids[:rows]) + shift).logits
        (token_nll(logits, ids[:rows], keep[:rows]).sum() / keep[:rows].sum()).backward()
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        del logits
    return (after - before) / (rows * t * vocab * 4)


def main() -> None:
    a, b, c = saved_bytes_per_token(256, 1024, 2), saved_bytes_per_token(256, 1024, 4), saved_bytes_per_token(256, 2048, 2)
    per_layer = (b - a) / 2
    per_i = (c - a) / 2 / 1024 / 4  # values per unit of I
    per_d = (per_layer / 4 - per_i * 1024) / 256
    result = {"command": "PYTHONPATH=src OMP_NUM_THREADS=1 python runs/fusion_memory.py",
              "saved_values_per_token_per_layer": {"per_D": round(per_d, 2), "per_I": round(per_i, 2),
                                                   "note": "Qwen2, D = 256 (4 heads of 64, one KV head), I = 1024/2048, "
                                                           "fp32; the KV and rotary widths counted in per_D"},
              "formula_per_layer": {"per_D": 8, "per_I": 3},
              "loss_peak_per_token_in_V_fp32": round(loss_peak_in_v(), 2), "formula_loss_in_V_fp32": 4,
              "torch": torch.__version__}
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT + ".tmp", "w") as f:
        json.dump(result, f, indent=2)
    os.replace(OUT + ".tmp", OUT)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
