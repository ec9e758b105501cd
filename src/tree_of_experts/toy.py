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
