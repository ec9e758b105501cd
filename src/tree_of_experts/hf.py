"""Thin glue to transformers: loading models by id or path, finding decoder layers, fingerprints.

Layer convention used everywhere in ToE: "layer l" is the *output of decoder layer l* (0-based), i.e. the residual
stream after l + 1 blocks. It equals ``output_hidden_states[l + 1]`` for every layer but the last one, because
transformers applies the final norm to ``output_hidden_states[-1]``; ToE reads states with forward hooks on the
decoder layers, never from ``output_hidden_states``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .config import ToEError

# Architecture fields that must match for a plug-in (or a cached extraction) to be valid on a base.
ARCH_KEYS = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "rope_theta",
    "rms_norm_eps",
    "max_position_embeddings",
)


def arch_fingerprint(config: Any) -> tuple[dict[str, Any], str]:
    """The base config fields that must match, and their sha256."""
    arch = {k: getattr(config, k, None) for k in ARCH_KEYS}
    arch = {k: v for k, v in arch.items() if v is not None and isinstance(v, (int, float, str, bool))}
    digest = hashlib.sha256(json.dumps(arch, sort_keys=True).encode()).hexdigest()
    return arch, digest


def versions() -> dict[str, str]:
    import transformers

    from . import __version__

    return {"tree_of_experts": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder blocks of a causal LM (Llama/Qwen/Mistral-style ``model.layers``, GPT-style ``h``)."""
    inner = model.get_decoder() if hasattr(model, "get_decoder") else model
    for owner in (inner, getattr(inner, "model", None), getattr(model, "transformer", None)):
        if owner is None:
            continue
        for name in ("layers", "h", "blocks"):
            layers = getattr(owner, name, None)
            if isinstance(layers, nn.ModuleList):
                return layers
    raise ToEError(f"cannot find the decoder layers of {type(model).__name__}: ToE supports decoder-only causal LMs")


def model_id(model: nn.Module) -> str:
    return getattr(model.config, "_name_or_path", "") or type(model).__name__


def pick_device(device: str | None) -> str:
    """``device``, or the GPU when one is visible (as `toe extract` and `toe train` pick through accelerate)."""
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def load_causal_lm(
    name_or_path: str, dtype: str | torch.dtype | None = "auto", device: str | None = None, **kwargs: Any
) -> nn.Module:
    """Loads a causal LM from a hub id or local folder (``gguf_file=...`` passes through), eval mode."""
    from transformers import AutoModelForCausalLM

    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, **kwargs)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ToEError(f"cannot load model {name_or_path!r} ({first}): pass a local folder or a reachable hub id") from None
    if device:
        model.to(device)
    return model.eval()


def load_tokenizer(name_or_path: str, **kwargs: Any):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    cls = AutoTokenizer
    config_path = os.path.join(name_or_path, "tokenizer_config.json")
    if os.path.isfile(config_path):
        with open(config_path) as f:
            declared = json.load(f).get("tokenizer_class")
        # A plain `tokenizers` tokenizer saved next to a model: AutoTokenizer would pick the model family's
        # tokenizer class (e.g. Qwen2Tokenizer) and silently drop its pre-tokenizer.
        if declared in ("TokenizersBackend", "PreTrainedTokenizerFast"):
            cls = PreTrainedTokenizerFast
    try:
        tok = cls.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ToEError(f"cannot load tokenizer {name_or_path!r} ({first}): pass a local folder or hub id") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def is_local(name_or_path: str) -> bool:
    return os.path.isdir(name_or_path)


def enable_checkpointing(model: nn.Module) -> None:
    """Activation checkpointing (recompute in backward, non-reentrant): transformers 5.x names it
    ``activation_checkpointing_enable`` and deprecates ``gradient_checkpointing_enable``; older versions have only
    the latter. A peft model forwards either to its base."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def edit_output(output: Any, fn) -> Any:
    """Applies ``fn`` to a decoder layer's hidden states, whichever output convention the layer uses.

    transformers < 5 returns a tuple ``(hidden, ...)`` from decoder layers; 5.x returns the tensor itself.
    """
    if isinstance(output, tuple):
        return (fn(output[0]), *output[1:])
    return fn(output)


def hidden_of(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


@contextlib.contextmanager
def capture_layers(model: nn.Module, layers: list[int]) -> Iterator[dict[int, torch.Tensor]]:
    """Records the outputs of the given decoder layers (see the layer convention above) during the block."""
    blocks = decoder_layers(model)
    seen: dict[int, torch.Tensor] = {}
    handles = [blocks[i].register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(i, hidden_of(o))) for i in layers]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


class _StopForward(Exception):
    """Raised by a hook once the last needed layer has run."""


def states_until(model: nn.Module, layers: list[int], inputs: dict) -> dict[int, torch.Tensor]:
    """Outputs of the given decoder layers, running the model only up to the deepest of them.

    Extraction needs the base's residual at the injection layer and nothing above it: stopping there skips the
    upper layers and the LM head (about half the base's cost for a middle layer).
    """
    blocks = decoder_layers(model)
    seen: dict[int, torch.Tensor] = {}
    last = max(layers)

    def hook(m, a, o, i):
        seen[i] = hidden_of(o)
        if i == last:
            raise _StopForward

    handles = [blocks[i].register_forward_hook(lambda m, a, o, i=i: hook(m, a, o, i)) for i in layers]
    try:
        model(**inputs)
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return seen


@contextlib.contextmanager
def add_to_layers(model: nn.Module, fns: dict[int, Any]) -> Iterator[None]:
    """Adds ``fns[i](h)`` (same shape as h) to the output of decoder layer i during the block."""
    blocks = decoder_layers(model)

    def make(fn):
        return lambda m, a, o: edit_output(o, lambda h: h + fn(h).to(h.dtype))

    handles = [blocks[i].register_forward_hook(make(fn)) for i, fn in fns.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def padded_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor, device: torch.device | str) -> dict:
    """Forward kwargs for a left-padded batch, with position ids counted from each row's first real token.

    Without explicit position ids a plain forward numbers left-padded rows from the padding; RoPE models are
    invariant to that shift, absolute-position models are not.
    """
    am = attention_mask.to(device)
    return {"input_ids": input_ids.to(device), "attention_mask": am, "position_ids": (am.cumsum(-1) - 1).clamp_min(0)}
