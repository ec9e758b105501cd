"""A model's decoder layers: finding them, hooks that read or edit their outputs, starting a forward at a layer,
gradient checkpointing of the frozen ones, and the inputs and caches of a forward.

Layer convention used everywhere in ToE: "layer l" is the *output of decoder layer l* (0-based), i.e. the residual
stream after l + 1 blocks. It equals ``output_hidden_states[l + 1]`` for every layer but the last one, because
transformers applies the final norm to ``output_hidden_states[-1]``; ToE reads states with forward hooks on the
decoder layers, never from ``output_hidden_states``."""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..errors import ToEError


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


def decoder_stack(model: nn.Module) -> nn.Module:
    """The module of a causal LM that runs its decoder layers (Qwen2Model, GPT2Model, ...: ``get_decoder()``), called by
    the LM with the same input ids, attention mask and cache, and called alone by trainers that apply the LM head
    themselves (trl's fused head)."""
    # get_decoder first: a peft model's base_model is its LoRA wrapper, which generation and a plain PeftModel skip
    stack = model.get_decoder() if hasattr(model, "get_decoder") else None
    if not isinstance(stack, nn.Module) or stack is model:
        stack = getattr(model, "base_model", None)
    return stack if isinstance(stack, nn.Module) else model


def enable_checkpointing(model: nn.Module, kwargs: dict | None = None, **options: Any) -> None:
    """Activation checkpointing (recompute in backward): transformers 5.x names it
    ``activation_checkpointing_enable`` and deprecates ``gradient_checkpointing_enable``; older versions have only
    the latter. A peft model forwards either to its base. ``options``: transformers 5.x's ``every_n_layers`` and
    ``offload``.

    Non-reentrant by default, which needs no gradient at the inputs: the hook transformers 5.x puts on the input
    embeddings to make their output require one is removed, else the backward runs through every frozen layer below
    the first trained one for nothing. ``use_reentrant=True`` keeps that hook (a reentrant checkpoint drops the
    gradients of a layer whose inputs need none)."""
    kwargs = {"use_reentrant": False, **(kwargs or {})}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs, **options)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs, **options)
    # the hook's handle: a list in transformers 5.x, one handle in 4.x (which adds it for peft models only)
    hooked = bool(getattr(model, "_require_grads_hooks", None)) or hasattr(model, "_require_grads_hook")
    if kwargs["use_reentrant"] and not hooked:
        model.enable_input_require_grads()
    elif not kwargs["use_reentrant"] and hooked:
        model.disable_input_require_grads()


def disable_checkpointing(model: nn.Module) -> None:
    """Turns activation checkpointing off again (either transformers name)."""
    if hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()


def is_checkpointing(model: nn.Module) -> bool:
    """Whether any module of ``model`` recomputes its activations in the backward."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def recompute_frozen_layers(model: nn.Module) -> None:
    """For a frozen base kept in eval mode with checkpointing on: transformers recomputes a decoder layer only while
    that layer is in training mode, so the decoder layers alone are flagged as training (not their submodules:
    dropout stays off). Without checkpointing, nothing changes."""
    if is_checkpointing(model):
        for layer in decoder_layers(model):
            layer.training = True


def checkpoint_frozen_layers(model: nn.Module, kwargs: dict | None = None, **options: Any) -> None:
    """Activation checkpointing for a frozen base kept in eval mode (the plug-in trains, the base must not drop
    out; see :func:`recompute_frozen_layers`)."""
    enable_checkpointing(model, kwargs, **options)
    recompute_frozen_layers(model)


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


@contextlib.contextmanager
def starting_at(model: nn.Module, layer: int, states: torch.Tensor) -> Iterator[None]:
    """Inside the block, a forward of ``model`` starts from ``states`` (B, T, D) as the output of decoder layer
    ``layer``: the layers below it pass their input through and that layer returns ``states`` without computing.

    Forward hooks still run on every layer, so a plug-in injecting at ``layer`` adds its Δ to ``states``. This is
    how training starts from an extraction's cached base states instead of running the frozen layers below the
    lowest injection layer; the batch must be the one the states were computed for (same tokens, same padding).
    """
    as_output = (lambda h: (h,)) if layers_return_tuples(model) else (lambda h: h)

    def through(*args, **kwargs):
        return as_output(args[0] if args else kwargs["hidden_states"])

    def cached(*args, **kwargs):
        return as_output(states)

    blocks = decoder_layers(model)
    if not 0 <= layer < len(blocks):
        raise ToEError(f"layer {layer} out of range: the model has {len(blocks)} decoder layers")
    saved = [blocks[i].__dict__.get("forward") for i in range(layer + 1)]  # e.g. accelerate's own wrappers
    for i in range(layer + 1):
        blocks[i].forward = through if i < layer else cached  # an instance attribute: Module.__call__ runs it
    try:
        yield
    finally:
        for i, forward in enumerate(saved):
            if forward is None:
                del blocks[i].forward
            else:
                blocks[i].forward = forward


def layers_return_tuples(model: nn.Module) -> bool:
    """Whether ``model``'s decoder layers return ``(hidden, ...)`` (many transformers 4.x models) or the tensor
    itself (5.x, and some late 4.x models): found once by a one-token forward stopped after the first layer, then
    remembered on the model."""
    known = getattr(model, "_toe_layers_return_tuples", None)
    if known is not None:
        return known
    seen: dict[str, bool] = {}

    def hook(m, a, output):
        seen["tuple"] = isinstance(output, tuple)
        raise _StopForward

    handle = decoder_layers(model)[0].register_forward_hook(hook)
    try:
        with torch.no_grad():
            model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=next(model.parameters()).device))
    except _StopForward:
        pass
    finally:
        handle.remove()
    model._toe_layers_return_tuples = seen["tuple"]
    return seen["tuple"]


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


def cache_kwargs(model: nn.Module, cache: Any) -> dict:
    """``{name: cache}``, the KV cache as ``model``'s forward takes it: transformers 5.25 renamed the argument
    ``past_key_values`` to ``cache`` (the old name warns, and goes in 5.40); earlier 5.x know the old name only."""
    params = inspect.signature(model.forward).parameters
    return {"cache" if "cache" in params else "past_key_values": cache}


def output_cache(output: Any) -> Any:
    """The KV cache a forward returned: its ``cache`` field from transformers 5.25 on (``past_key_values`` there
    is a property that warns), ``past_key_values`` before."""
    names = {f.name for f in dataclasses.fields(output)}
    return output.cache if "cache" in names else output.past_key_values


def spread(model: nn.Module) -> bool:
    """Whether a device map placed the model over several devices (accelerate's hooks move the activations)."""
    placed = getattr(model, "hf_device_map", None)
    return bool(placed) and len(set(placed.values())) > 1


def keep_index(model: nn.Module, keep: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``logits_to_keep`` positions for ``model``: on ``device``, or on the CPU for a model spread over devices
    (its last hidden states sit on its last device, and a CPU index serves any device)."""
    return keep.cpu() if spread(model) else keep.to(device)


def input_device(model: nn.Module) -> torch.device:
    """Where a model's inputs go: its parameters' device, or for a model dispatched over several devices by a device
    map (accelerate's hooks move each layer's inputs), the device of its first module (the CPU for disk)."""
    if spread(model):
        first = next(iter(model.hf_device_map.values()))
        return torch.device("cpu" if first in ("cpu", "disk") else (f"cuda:{first}" if isinstance(first, int)
                                                                    else first))
    return next(model.parameters()).device
