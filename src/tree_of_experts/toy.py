"""Tiny in-process models and tokenizers: for tests, the demo's toy world and benchmarks. No downloads."""

from __future__ import annotations

import string

import torch
from torch import nn

SPECIALS = ["<pad>", "<eos>", "<unk>"]
# Characters are tokens (digits one by one), plus a few whole words the toy world and test fixtures use.
WORDS = ["Question", "Answer", "key", "value", "is", "what", "the", "of", "plus", "minus", "times", "so", "then"]


def tiny_tokenizer(extra_words: list[str] | None = None):
    """A word/char-level ``PreTrainedTokenizerFast``: whole known words, otherwise one token per character."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = WORDS + (extra_words or [])
    chars = list(string.digits + string.ascii_letters + string.punctuation + " \n")
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(SPECIALS + words + chars))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    alternatives = "|".join(sorted(words, key=len, reverse=True))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(rf"{alternatives}|[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    fast.padding_side = "left"
    return fast


def tiny_qwen2(
    hidden_size: int = 32,
    num_layers: int = 2,
    vocab_size: int | None = None,
    seed: int = 0,
    intermediate_size: int | None = None,
    heads: int = 4,
) -> nn.Module:
    """A randomly initialised Qwen2 causal LM (float32, eval mode) sized for tests."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if vocab_size is None:
        vocab_size = len(tiny_tokenizer())
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = 1
    return model.eval()


# -- the toy world of `toe demo` ------------------------------------------------------------------------------------
# Sixteen keys each hold a secret digit. Problems ask for the sum of two keys' values; the solution names both values
# and adds them. The teacher was trained on problems with the true values, the base on the same format with random
# values (so it knows the format and the arithmetic, not the values). A plug-in can only help the base by carrying
# *which value each key has* from the teacher's states into the base's residual stream.
KEYS = ["ax", "bo", "cu", "di", "ef", "fy", "gu", "ha", "io", "ju", "ke", "lo", "mu", "ny", "ox", "pi"]
TOY_WORDS = KEYS + ["and"]


def toy_tokenizer():
    return tiny_tokenizer(extra_words=TOY_WORDS)


def toy_values(seed: int = 1234) -> dict[str, int]:
    g = torch.Generator().manual_seed(seed)
    return {k: int(v) for k, v in zip(KEYS, torch.randint(0, 10, (len(KEYS),), generator=g))}


def toy_problem(g: torch.Generator, values: dict[str, int] | None, explicit: bool = False) -> dict:
    """One problem as a GSM8K-style row. ``values=None`` draws random values (what the base is trained on)."""
    if explicit:
        a, b = (int(x) for x in torch.randint(0, 10, (2,), generator=g))
        return {"question": f"what is {a} plus {b}?", "answer": f"{a} plus {b} is {a + b}.\n#### {a + b}"}
    i, j = (int(x) for x in torch.randint(0, len(KEYS), (2,), generator=g))
    ka, kb = KEYS[i], KEYS[j]
    if values is None:
        a, b = (int(x) for x in torch.randint(0, 10, (2,), generator=g))
    else:
        a, b = values[ka], values[kb]
    return {"question": f"what is {ka} plus {kb}?",
            "answer": f"{ka} is {a} and {kb} is {b} so {a} plus {b} is {a + b}.\n#### {a + b}"}


def toy_rows(n: int, seed: int, values: dict[str, int] | None, explicit_share: float = 0.0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [toy_problem(g, values, explicit=bool(torch.rand((), generator=g) < explicit_share)) for _ in range(n)]


def train_toy_lm(model: nn.Module, tok, rows_fn, steps: int, batch_size: int = 64, lr: float = 3e-3,
                 seed: int = 0) -> list[float]:
    """Trains a tiny LM on the answers of ``rows_fn(step)`` (a fresh batch of rows per step)."""
    from .data import DataSpec, encode, pad_left
    from .hf.layers import padded_inputs
    from .losses import token_nll

    spec = DataSpec()
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    losses = []
    for step in range(steps):
        enc = [encode(tok, spec.prompt(r), spec.response(r)) for r in rows_fn(step)]
        ids, am = pad_left([e.input_ids for e in enc], tok.pad_token_id)
        mask = pad_left([e.loss_mask.long() for e in enc], 0)[0].bool()
        logits = model(**padded_inputs(ids, am, "cpu")).logits
        loss = token_nll(logits, ids, mask).sum() / mask.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses
