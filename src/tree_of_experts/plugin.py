"""Fusion: a tree gate + expert bank + scale per injection layer, added to the residual stream by forward hooks.

``h_t <- h_t + Δ_t`` with ``Δ_t = a_t · s ⊙ Σ_{i∈K} g_i e_i``, clipped to ``||Δ_t|| <= κ ||h_t||`` and zero at the
first real token of every sequence (the attention sink) and on padding. ``s`` starts at zero, so a fresh plug-in
is an exact no-op: logits are bit-identical to the bare base.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from .bank import ExpertBank
from .config import CONFIG_NAME, WEIGHTS_NAME, ToEConfig, ToEError
from .files import atomic_save_tensors
from .hf.hub import model_id
from .hf.layers import decoder_layers, decoder_stack, edit_output
from .hf.loading import same_weights, weight_sample
from .injection import InjectionLayer, Record
from .positions import injection_mask, past_length
from .tensorfile import DTYPES, TensorFileError, map_tensors, read_header
from .tree import selection_mass

log = logging.getLogger(__name__)
# The plausibility bound on a loaded plug-in's values: trained banks, gates and scales hold values of order 1 (the
# real-pair runs' leaf norms average 1.2, their scales 1.1); a value beyond 1e4 in magnitude is a damaged or
# hand-made file, and would swamp the residual stream until the norm clip hides it.
MAX_ABS = 1e4
# The tensors that grow with N, which ToEPlugin.load can map from the file instead of reading: routing reads a few of
# their rows per token (the bank's K rows; a beam's K log2 N node rows). Per leaf, D floats of bank and r of gate.
MAPPABLE = ("bank.direction", "bank.norm", "gate.nodes.weight", "gate.nodes.bias")
# Above this many bytes of them, load maps by default: a bank that size (2^18 leaves at D = 896, float32) takes
# seconds to read and as much RAM as the base, and is rarely trained again.
MMAP_AUTO_BYTES = 1 << 30


def shapes_only(config: ToEConfig) -> ToEPlugin:
    """The plug-in ``config`` describes, on the meta device: its tensors' shapes and dtypes with nothing allocated
    (built as a beam gate where the tree is balanced, which keeps no path tables: they are not saved either)."""
    if config.shape == "balanced":
        config = dataclasses.replace(config, selection="beam")
    with torch.device("meta"):
        return ToEPlugin(config)


class ToEPlugin(nn.Module):
    """All injection layers of one plug-in, and the hooks that put them into a base model."""

    def __init__(self, config: ToEConfig, banks: dict[int, ExpertBank] | None = None):
        super().__init__()
        self.config = config
        banks = banks or {}
        self.blocks = nn.ModuleDict()
        for layer in config.layers:
            bank = banks.get(layer)
            if bank is None:
                info = dict(config.bank_info.get(str(layer), {}))
                bank = ExpertBank(torch.randn(config.num_leaves, config.hidden_size) * 0.02, info or {"init": "random"})
            self.blocks[str(layer)] = InjectionLayer(config, bank)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._base: weakref.ref | None = None  # the model the hooks are on (weak: the plug-in does not keep it)
        self._mask: torch.Tensor | None = None  # (B, T) for the forward in progress, set by the stack's pre-hook
        self._routes: dict[int, Record] | None = None
        self._mass: dict[int, torch.Tensor] | None = None  # per-layer selection mass while counting()
        self._delta: dict[int, torch.Tensor] | None = None  # per-layer (Σ ||Δ||/||h||, tokens) while counting()
        self.delta_ratio: dict[int, float] = {}  # mean ||Δ||/||h|| per layer over the last counting() block
        self.selection: str | None = None  # per-call override of the configured selection mode
        self.adapter_source: str | None = None  # the LoRA adapter folder merged into the base (config.base_adapter)

    # -- hooks -------------------------------------------------------------------------------------------------
    @property
    def is_attached(self) -> bool:
        return bool(self._handles)

    @contextlib.contextmanager
    def attached(self, model: nn.Module) -> Iterator[ToEPlugin]:
        """``with plugin.attached(model):`` the plug-in's hooks are on ``model`` inside the block and gone after it
        (if it was already attached there, it stays attached)."""
        was = self.is_attached
        self.attach(model)
        try:
            yield self
        finally:
            if not was:
                self.detach()

    def attach(self, model: nn.Module, share: bool = False) -> ToEPlugin:
        """Registers the hooks on ``model`` (a causal LM); returns self. Idempotent. Another plug-in attached to
        ``model`` is detached first, with a warning (two would add up silently: e.g. a fresh plug-in saved, then
        loaded onto the same base), unless ``share`` (peft's several active adapters, which add up by design)."""
        if self._handles:
            return self
        layers = decoder_layers(model)
        bad = [layer for layer in self.config.layers if layer >= len(layers)]
        if bad:
            raise ToEError(f"layers {bad} out of range: the base has {len(layers)} decoder layers (0..{len(layers) - 1})")
        self._check_weights(model)
        # the positions to edit come from the decoder stack's own inputs: the LM calls it with them, and trainers
        # that apply the LM head themselves (trl's fused head) call the stack alone
        # the plug-ins that have hooked this model (a WeakSet on it: no entry outlives its plug-in, none repeats)
        hooked = model.__dict__.setdefault("_toe_plugins", weakref.WeakSet())
        others = [] if share else [p for p in hooked if p is not self and p.is_attached and p._base() is model]
        for other in others:  # two would add up silently: the newer plug-in takes the base
            other.detach()
            log.warning("warning: the base carried another ToE plug-in; its hooks are removed (one plug-in per base: "
                        "load the base again for a second one, or combine adapters with peft)")
        self._handles.append(decoder_stack(model).register_forward_pre_hook(self._pre_hook, with_kwargs=True))
        for layer in self.config.layers:
            self._handles.append(layers[layer].register_forward_hook(self._layer_hook(layer)))
            device = next(layers[layer].parameters(), torch.empty(0)).device  # a base spread over devices: its own
            block = self.blocks[str(layer)]
            if device.type != "meta" and not any(p.is_meta for p in block.parameters()):
                block.to(device)
        hooked.add(self)
        self._base = weakref.ref(model)
        return self

    def _apply(self, fn: Any, recurse: bool = True) -> ToEPlugin:
        """Moves follow ``.to(device)``; casts do not: the plug-in computes in its own dtype (float32) whatever
        the base is cast to (``model.to(torch.bfloat16)``, ``.half()``, Trainer's ``bf16_full_eval``, trl's cast of
        the trainable parameters), so a cast of the whole model neither rounds its weights nor breaks its
        forward."""
        def move_only(t: torch.Tensor) -> torch.Tensor:
            out = fn(t)
            return t.to(out.device) if t.is_floating_point() and out.dtype != t.dtype else out

        return super()._apply(move_only, recurse)

    def _check_weights(self, model: nn.Module) -> None:
        """Records a sample of the base's weights the first time the plug-in meets a base (it is saved with the
        config); warns, once, when a later base has the same architecture (checked by the caller) but other weights:
        the bank and gate were fitted to the recorded base's hidden states."""
        sample = weight_sample(model)
        recorded = self.config.base_weight_sample
        if recorded is None:
            self.config.base_weight_sample = sample
        elif sample is not None and not same_weights(recorded, sample) and not getattr(self, "_warned", False):
            self._warned = True
            log.warning("warning: the plug-in was built on %s, and %s has the same architecture but other weights: "
                        "its bank and gate were fitted to the other base's hidden states; load the base it was built "
                        "for", self.config.base_name or self.config.base_model or "another base", model_id(model))

    def detach(self) -> None:
        """Removes every hook; the base then computes exactly what it computed before ``attach``."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._mask = None
        self._base = None

    def _pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        ref = ids if ids is not None else kwargs.get("inputs_embeds")
        if ref is None:
            self._mask = None
            return
        batch, length = ref.shape[0], ref.shape[1]
        # The KV cache is `past_key_values` up to transformers 5.x's `cache`; generate passes no attention mask
        # when nothing is padded, so the cache length is then all that tells a decode step from a prompt.
        past = kwargs.get("past_key_values", kwargs.get("cache"))
        past_len = past_length(past)
        cache_position = kwargs.get("cache_position")
        if kwargs.get("attention_mask") is None and cache_position is not None:
            past_len = int(cache_position[0])  # only read without a mask (a sync, but off the usual path)
        self._mask = injection_mask(batch, length, ref.device, kwargs.get("attention_mask"), past_len,
                                    kwargs.get("position_ids"))

    def _layer_hook(self, layer: int):
        block = self.blocks[str(layer)]

        def add_delta(h: torch.Tensor) -> torch.Tensor:
            mask = self._mask
            if mask is None or mask.shape != h.shape[:2]:
                mask = injection_mask(h.shape[0], h.shape[1], h.device, None, 0)
            mask = mask.to(h.device)  # (a base spread over devices: this layer's; a no-op on one device)
            delta, route = block(h, mask, self.selection)
            if self._routes is not None:
                ratio = (delta.norm(dim=-1) / h.float().norm(dim=-1).clamp_min(1e-6) * mask).sum() / mask.sum().clamp_min(1)
                self._routes[layer] = Record(route, mask, ratio)
            if self._mass is not None:
                mass = selection_mass(route, self.config.num_leaves, mask).detach()
                self._mass[layer] = self._mass[layer] + mass if layer in self._mass else mass
                r = delta.detach().norm(dim=-1) / h.detach().float().norm(dim=-1).clamp_min(1e-6)
                tot = torch.stack([(r * mask).sum(), mask.sum()])
                self._delta[layer] = self._delta[layer] + tot if layer in self._delta else tot
            return h + delta.to(h.dtype)

        return lambda module, args, output: edit_output(output, add_delta)

    def compile(self, **options: Any) -> ToEPlugin:
        """Compiles each injection layer's computation with ``torch.compile`` (``options`` go to it, e.g.
        ``mode="max-autotune"`` or ``backend="eager"``); returns self. The gate has no graph break and no host
        sync, so the hook runs as a few fused kernels: worth it where per-op dispatch is a visible share of a
        decode step (small bases, batch 1). The first calls at a new shape pay the compilation."""
        for block in self.blocks.values():
            block.compile(**options)
        return self

    @contextlib.contextmanager
    def recording(self) -> Iterator[dict[int, Record]]:
        """Collects each injection layer's routing Record during the forward run inside the block (for aux losses)."""
        self._routes = {}
        try:
            yield self._routes
        finally:
            self._routes = None

    @contextlib.contextmanager
    def counting(self) -> Iterator[dict[int, torch.Tensor]]:
        """Sums, over every forward run inside the block, the mixing weight each leaf received on injected tokens:
        {layer: (N,)}, the leaf usage at inference (prefill and each decode step alike). After the block,
        ``delta_ratio`` holds each layer's mean ||Δ|| / ||h|| over the same tokens: how hard the plug-in pushed."""
        self._mass, self._delta = {}, {}
        try:
            yield self._mass
        finally:
            self.delta_ratio = {layer: float(t[0] / t[1].clamp_min(1)) for layer, t in self._delta.items()}
            self._mass, self._delta = None, None

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """The plug-in's parameters by role, the one place they are named: ``gate`` (trunk, node logits, intensity),
        ``scale`` (the per-channel scales s) and ``bank`` (leaf directions and norms) — each its own optimizer
        group in `toe train`."""
        groups: dict[str, list[nn.Parameter]] = {"gate": [], "scale": [], "bank": []}
        for block in self.blocks.values():
            groups["gate"] += list(block.gate.parameters())
            groups["scale"].append(block.scale)
            groups["bank"] += list(block.bank.parameters())
        return groups

    # -- persistence --------------------------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike, state: dict[str, torch.Tensor] | None = None,
             record: Callable[[ToEConfig], ToEConfig] | None = None) -> None:
        """Writes ``toe_config.json`` and ``toe_model.safetensors``: each bank in ``config.bank_dtype``, everything
        else float32, converted and written a few MB at a time (a mapped bank is read from its own file as it is
        written, never wholly resident; a bank in RAM is not copied).

        Args:
            state: the plug-in's tensors to write instead of the live ones (a trainer's gathered state dict).
            record: gives the config to write from the plug-in's own (e.g. with hub ids in place of local paths,
                :func:`tree_of_experts.model.recorded_config`); the live config is left as it is.
        """
        os.makedirs(directory, exist_ok=True)
        self.config.bank_info = {k: b.bank.info for k, b in self.blocks.items()}
        state = self.state_dict() if state is None else state
        assert state.keys() == self.state_dict().keys(), sorted(set(state) ^ set(self.state_dict()))[:3]
        bank_dtype = getattr(torch, self.config.bank_dtype)
        atomic_save_tensors(
            os.path.join(directory, WEIGHTS_NAME),
            state,
            metadata={"format": "pt", "toe_format_version": str(self.config.format_version)},
            dtypes={k: bank_dtype if k.endswith((".bank.direction", ".bank.norm")) else torch.float32 for k in state},
        )
        (record(self.config) if record is not None else self.config).save(directory)

    @classmethod
    def load(cls, directory: str | os.PathLike, config: ToEConfig | None = None, mmap: bool | None = None) -> ToEPlugin:
        """Reads a plug-in folder; every tensor must be present with the shape the config implies, finite, and at
        most ``MAX_ABS`` (1e4) in magnitude; the config's fields are checked by type and range (ToEConfig).

        Args:
            mmap: map each layer's bank and gate node weights (the tensors that grow with N, :data:`MAPPABLE`) from
                the file instead of reading them: a page is read when routing first touches it, so resident memory
                grows with the rows routed to (K per token with ``selection="beam"``; every row with the others),
                not with N. Mapped tensors keep the file's dtype, are frozen (training them is refused), and are not
                scanned for NaN or magnitude (that would read every page). None (default) maps when they hold at
                least ``MMAP_AUTO_BYTES`` (1 GiB).
        """
        config = config or ToEConfig.load(directory)
        path = os.path.join(directory, WEIGHTS_NAME)
        if not os.path.isfile(path):
            raise ToEError(f"{path} not found: the folder has {CONFIG_NAME} but no weights; re-save the plug-in")
        try:
            if mmap is None:
                _, header, _ = read_header(path)
                big = sum(DTYPES[e["dtype"]].itemsize * math.prod(e["shape"]) for key, e in header.items()
                          if key.endswith(MAPPABLE))
                mmap = big >= MMAP_AUTO_BYTES
                if mmap:
                    log.info("mapping the %.1f GB bank of %s from disk (mmap=False reads it into RAM)", big / 1e9, path)
            state = map_tensors(path) if mmap else load_file(path)
        except (SafetensorError, TensorFileError, OSError) as e:
            raise ToEError(f"{path} is unreadable ({e}): the file is corrupted, re-save or re-download it") from None
        mapped = {key for key in state if mmap and key.endswith(MAPPABLE)
                  and (state[key].dtype == torch.float32 or key.endswith(("bank.direction", "bank.norm")))}
        # Mapped tensors are not scanned: that would read every page
        scanned = {key: value for key, value in state.items() if key not in mapped}
        bad = [key for key, value in scanned.items() if value.is_floating_point() and not torch.isfinite(value).all()]
        if bad:
            raise ToEError(f"{path} holds NaN or inf values ({', '.join(bad[:3])}): the plug-in is broken (a diverged "
                           "training run?); retrain it or restore an earlier copy")
        peaks = {key: float(value.abs().max()) for key, value in scanned.items() if value.is_floating_point() and
                 value.numel()}
        huge = [key for key, peak in peaks.items() if peak > MAX_ABS]
        if huge:
            raise ToEError(f"{path}: {huge[0]} holds a value of magnitude {peaks[huge[0]]:.3g}, beyond the plausible "
                           f"{MAX_ABS:g} (trained plug-ins hold values of order 1): the file is damaged or was not "
                           "written by training; retrain it or restore an earlier copy")
        with torch.device("meta"):  # shapes alone: every tensor comes from the file, none is made twice
            plugin = cls(config)
        expected = plugin.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ToEError(
                f"{path} does not match {CONFIG_NAME}: missing {missing[:3]}, unexpected {unexpected[:3]}; "
                "the weights and config come from different plug-ins"
            )
        for key, value in state.items():
            if value.shape != expected[key].shape:
                raise ToEError(
                    f"{path}: {key} has shape {tuple(value.shape)} but {CONFIG_NAME} implies "
                    f"{tuple(expected[key].shape)}; the weights and config come from different plug-ins"
                )
        # assign: the module takes the tensors as they are (mapped ones stay views of the file), so the unmapped
        # are copies of the file's values in float32, in RAM and writable
        plugin.load_state_dict({key: value if key in mapped else value.to(torch.float32, copy=True)
                                for key, value in state.items()}, assign=True)
        for block in plugin.blocks.values():
            block.bank.mapped = bool(mapped)
            for p in block.mapped_parameters():
                p.requires_grad_(False)
        if config.base_adapter:  # ToE on a LoRA-adapted base: the adapter copy in the folder travels with it
            plugin.adapter_source = os.path.join(os.fspath(directory), config.base_adapter)
        return plugin
