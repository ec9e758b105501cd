"""ToEModel: a frozen base causal LM with a ToE plug-in attached, loadable and savable like a peft adapter."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .config import ToEConfig, ToEError
from .hf import arch_fingerprint, load_causal_lm, model_id, versions
from .io import atomic_write_text
from .plugin import ToEPlugin


def freeze(model: nn.Module) -> nn.Module:
    """The one place the base is frozen: no gradients, no optimizer state, eval mode (no dropout)."""
    model.requires_grad_(False)
    return model.eval()


def check_base(config: ToEConfig, base: nn.Module) -> None:
    """Refuses a base whose architecture differs from the one the plug-in was built for, naming the field."""
    arch, digest = arch_fingerprint(base.config)
    if config.base_config_hash and digest != config.base_config_hash:
        diffs = [f"{k}: plug-in {config.base_arch.get(k)!r} vs base {arch.get(k)!r}"
                 for k in sorted(set(arch) | set(config.base_arch)) if arch.get(k) != config.base_arch.get(k)]
        detail = "; ".join(diffs) or "config hash differs"
        raise ToEError(
            f"this plug-in was built for {config.base_model or 'another base'} and does not fit "
            f"{model_id(base)} ({detail}): load the base it was built for"
        )
    if base.config.hidden_size != config.hidden_size:
        raise ToEError(f"plug-in hidden_size={config.hidden_size} but the base has {base.config.hidden_size}")


def new_config(base: nn.Module, **fields: Any) -> ToEConfig:
    """A ToEConfig for ``base`` with its fingerprint filled in; ``fields`` are ToEConfig fields."""
    arch, digest = arch_fingerprint(base.config)
    fields.setdefault("hidden_size", base.config.hidden_size)
    return ToEConfig(
        base_model=model_id(base),
        base_revision=getattr(base.config, "_commit_hash", None),
        base_arch=arch,
        base_config_hash=digest,
        versions=versions(),
        **fields,
    )


class ToEModel(nn.Module):
    """A frozen base with a plug-in attached. Calling it returns the base's output (``.logits`` etc.).

    Args:
        base: a transformers causal LM; it is frozen here.
        plugin: the plug-in to attach (checked against the base).
    """

    def __init__(self, base: nn.Module, plugin: ToEPlugin):
        super().__init__()
        check_base(plugin.config, base)
        self.base = freeze(base)
        self.plugin = plugin.to(next(base.parameters()).device)
        self.plugin.attach(self.base)

    @property
    def config(self) -> ToEConfig:
        return self.plugin.config

    @classmethod
    def from_pretrained(
        cls, base: str | nn.Module, plugin_dir: str | os.PathLike, **load_kwargs: Any
    ) -> ToEModel:
        """Loads ``base`` (hub id, local folder, or a loaded model) and the plug-in folder ``plugin_dir``.

        ``load_kwargs`` go to ``AutoModelForCausalLM.from_pretrained`` (``dtype``, ``revision``, ``gguf_file``...).
        """
        config = ToEConfig.load(plugin_dir)
        if isinstance(base, (str, os.PathLike)):
            base = load_causal_lm(os.fspath(base), **load_kwargs)
        check_base(config, base)  # before reading the weights: the cheap, likely error first
        return cls(base, ToEPlugin.load(plugin_dir, config))

    @classmethod
    def fresh(cls, base: nn.Module, **fields: Any) -> ToEModel:
        """A new plug-in with a random bank on ``base`` (``fields``: ToEConfig fields such as layers, num_leaves)."""
        return cls(base, ToEPlugin(new_config(base, **fields)))

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Writes ``toe_config.json``, ``toe_model.safetensors`` (plug-in tensors only) and a ``README.md`` card."""
        self.plugin.save(directory)
        atomic_write_text(os.path.join(directory, "README.md"), model_card(self.config, self.plugin))

    # -- running ------------------------------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.base(*args, **kwargs)

    @torch.no_grad()
    def generate(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.base.generate(*args, **kwargs)

    def attach(self) -> ToEModel:
        self.plugin.attach(self.base)
        return self

    def detach(self) -> nn.Module:
        """Removes the hooks and returns the bare base."""
        self.plugin.detach()
        return self.base

    @contextlib.contextmanager
    def disabled(self) -> Iterator[nn.Module]:
        """Runs the bare base inside the block, re-attaching afterwards if the plug-in was attached."""
        was = self.plugin.attached
        self.plugin.detach()
        try:
            yield self.base
        finally:
            if was:
                self.plugin.attach(self.base)

    @contextlib.contextmanager
    def selection(self, mode: str | None = None, top_k: int | None = None, top_p: float | None = None
                  ) -> Iterator[None]:
        """Routes with ``mode`` ("dense", "topk", "topp", "beam"), K and p inside the block; None keeps the configured
        value. Nothing is retrained: an inference-time sweep of K or p on a plug-in trained with another one."""
        overrides = {k: v for k, v in (("selection", mode), ("top_k", top_k), ("top_p", top_p)) if v is not None}
        dataclasses.replace(self.plugin.config, **overrides)  # the config's own checks (one-line ToEErrors)
        gates = [block.gate for block in self.plugin.blocks.values()]
        previous = self.plugin.selection, [(g.top_k, g.top_p) for g in gates]
        self.plugin.selection = mode or self.plugin.selection
        for g in gates:
            g.top_k = min(top_k, g.num_leaves) if top_k is not None else g.top_k
            g.top_p = top_p if top_p is not None else g.top_p
        try:
            yield
        finally:
            self.plugin.selection = previous[0]
            for g, (k, p) in zip(gates, previous[1]):
                g.top_k, g.top_p = k, p

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.plugin.parameters() if p.requires_grad]


def inspect(plugin: str) -> dict:
    """What a plug-in folder holds, without loading the base: config, parameter count and, per injection layer, the
    learned scale and the geometry of the bank as stored (e_i) and as injected for a one-leaf route (s ⊙ e_i) —
    ``common_share`` near 1 means the leaves are one shared vector and routing cannot matter
    (:func:`tree_of_experts.bank.geometry`).

    Args:
        plugin: a plug-in folder (`toe extract`, `toe train` or `toe baseline` output).
    """
    from .bank import geometry

    module = ToEPlugin.load(plugin)
    config = module.config
    layers = {}
    for layer, block in module.blocks.items():
        bank = block.bank.vectors().detach()
        scale = block.scale.detach()
        layers[layer] = {"scale_abs_mean": float(scale.abs().mean()), "bank": geometry(bank),
                         "injected": geometry(scale * bank)}
    return {"plugin": str(plugin), "base": config.base_model, "teacher": config.teacher_model,
            "layers": config.layers, "teacher_layers": config.teacher_layers, "shape": config.shape,
            "num_leaves": config.num_leaves, "selection": config.selection, "top_k": config.top_k,
            "parameters": sum(p.numel() for p in module.parameters()), "banks": layers}


def model_card(config: ToEConfig, plugin: ToEPlugin) -> str:
    n_params = sum(p.numel() for p in plugin.parameters())
    lines = [
        "---",
        "library_name: tree-of-experts",
        f"base_model: {config.base_model}",
        "tags: [tree-of-experts, toe, plug-in]",
        "---",
        "",
        f"# ToE plug-in for `{config.base_model}`",
        "",
        "A Tree-of-Experts plug-in: a tree gate and an expert bank added to the residual stream of a frozen base. "
        "The base's weights are not stored here and never change.",
        "",
        "| field | value |",
        "|---|---|",
        f"| base | `{config.base_model}` (config sha256 `{config.base_config_hash[:12]}`) |",
        f"| teacher | `{config.teacher_model or '-'}` (layers {config.teacher_layers or '-'}) |",
        f"| injection layers | {config.layers} |",
        f"| tree | {config.shape}, N = {config.num_leaves}, depth {config.depth} |",
        f"| selection | {config.selection} (K = {config.top_k}, p = {config.top_p}) |",
        f"| gate rank / clip κ | {config.gate_rank} / {config.clip} |",
        f"| parameters | {n_params:,} |",
        "",
        "```python",
        "from tree_of_experts import ToEModel",
        f'model = ToEModel.from_pretrained("{config.base_model}", "path/to/this/folder")',
        "```",
        "",
    ]
    for layer, info in config.bank_info.items():
        if info:
            lines.append(f"Bank at layer {layer}: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    return "\n".join(lines) + "\n"
