"""A Tree-of-Experts model exported by `toe export`: a frozen base causal LM plus a ToE plug-in, in one folder.

Loaded with ``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)``; needs torch and transformers,
not tree_of_experts. The base is built from ``config.text_config`` (its weights under ``base.``); the plug-in (a
tree gate, an expert bank and a scale per injection layer, under ``plugin.blocks.<layer>.``) adds

    h_t <- h_t + Δ_t,  Δ_t = a_t · s ⊙ Σ_{i∈K} g_i e_i,  ||Δ_t|| <= κ ||h_t||,  Δ_t = 0 at the first real token and on padding

to the output of its decoder layers through forward hooks, as ``tree_of_experts.ToEModel`` does: the same code
(``toe_tree.py``, ``toe_bank.py`` and ``toe_positions.py`` are copies of the library's ``tree.py``, ``bank.py`` and
``positions.py``), so the same logits.
Axes: B batch, T tokens, D hidden, N leaves.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel

from .configuration_toe import ToEExportConfig
from .toe_bank import ExpertBank
from .toe_positions import injection_mask, past_length
from .toe_tree import TreeGate, path_gather_table


class InjectionLayer(nn.Module):
    """Gate, bank and scale for one decoder layer (``tree_of_experts.plugin.InjectionLayer``)."""

    def __init__(self, toe: dict[str, Any]):
        super().__init__()
        d, n = toe["hidden_size"], toe["num_leaves"]
        options = {k: toe[k] for k in ("query_norm",) if k in toe}  # gate options newer than the first format
        self.gate = TreeGate(d, n, toe["shape"], toe["gate_rank"], toe["selection"], toe["top_k"], toe["top_p"],
                             toe["intensity"], **options)
        self.bank = ExpertBank(torch.zeros(n, d))
        self.scale = nn.Parameter(torch.zeros(d))
        self.clip = toe["clip"]

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Δ (B, T, D) float32 for hidden states ``h`` (B, T, D) where ``mask`` (B, T) is 1."""
        route = self.gate(h)
        return self.bank.delta(route, self.gate.selection == "dense", self.scale, h, self.clip, mask)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    inner = model.get_decoder() if hasattr(model, "get_decoder") else model
    for owner in (inner, getattr(inner, "model", None), getattr(model, "transformer", None)):
        for name in ("layers", "h", "blocks"):
            layers = getattr(owner, name, None) if owner is not None else None
            if isinstance(layers, nn.ModuleList):
                return layers
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__}")


class ToEPlugin(nn.Module):
    """The injection layers and the hooks that put them into the base."""

    def __init__(self, toe: dict[str, Any]):
        super().__init__()
        self.layers = list(toe["layers"])
        self.blocks = nn.ModuleDict({str(layer): InjectionLayer(toe) for layer in self.layers})
        self._mask: torch.Tensor | None = None  # (B, T) of the forward in progress

    def attach(self, model: nn.Module) -> None:
        # the decoder stack: the LM calls it with the mask and cache
        stack = model.get_decoder() if hasattr(model, "get_decoder") else None
        if not isinstance(stack, nn.Module) or stack is model:
            stack = getattr(model, "base_model", None)
        (stack if isinstance(stack, nn.Module) else model).register_forward_pre_hook(self._pre_hook, with_kwargs=True)
        blocks = decoder_layers(model)
        for layer in self.layers:
            blocks[layer].register_forward_hook(self._layer_hook(layer))

    def _pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        ref = ids if ids is not None else kwargs.get("inputs_embeds")
        if ref is None:
            self._mask = None
            return
        # generate passes no attention mask when nothing is padded: the cache length then tells decode from prompt.
        past_len = past_length(kwargs.get("past_key_values", kwargs.get("cache")))
        cache_position = kwargs.get("cache_position")
        if kwargs.get("attention_mask") is None and cache_position is not None:
            past_len = int(cache_position[0])
        self._mask = injection_mask(ref.shape[0], ref.shape[1], ref.device, kwargs.get("attention_mask"), past_len,
                                    kwargs.get("position_ids"))

    def _layer_hook(self, layer: int):
        block = self.blocks[str(layer)]

        def add_delta(h: torch.Tensor) -> torch.Tensor:
            mask = self._mask
            if mask is None or mask.shape != h.shape[:2]:
                mask = injection_mask(h.shape[0], h.shape[1], h.device, None, 0)
            return h + block(h, mask.to(h.device)).to(h.dtype)

        def hook(module: nn.Module, args: tuple, output: Any) -> Any:
            # Decoder layers return a tuple (hidden, ...) in transformers < 5 and the tensor itself in 5.x.
            if isinstance(output, tuple):
                return (add_delta(output[0]), *output[1:])
            return add_delta(output)

        return hook


class ToEForCausalLM(PreTrainedModel, GenerationMixin):
    """The base causal LM with the plug-in attached; ``forward`` and ``generate`` are the base's, hooked."""

    config_class = ToEExportConfig
    base_model_prefix = ""
    _keep_in_fp32_modules_strict = ["plugin"]  # the gate computes in float32 whatever the base's dtype
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def __init__(self, config: ToEExportConfig):
        super().__init__(config)
        self.base = AutoModelForCausalLM.from_config(config.text_config)
        self.base.requires_grad_(False)
        self.plugin = ToEPlugin({**config.toe, "hidden_size": config.text_config.hidden_size})
        self.plugin.attach(self.base)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        # Every tensor is in the checkpoint but the gate's path tables (derived, not saved): rebuild them.
        if isinstance(module, TreeGate) and module.shape == "balanced":
            nodes, signs = path_gather_table(module.num_leaves)
            module.path_nodes = nodes.to(module.nodes.weight.device)
            module.path_signs = signs.to(module.nodes.weight.device)

    def get_input_embeddings(self) -> nn.Module:
        return self.base.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module | None:
        return self.base.get_output_embeddings()

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, **kwargs: Any) -> Any:
        named = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                     inputs_embeds=inputs_embeds, labels=labels)
        return self.base(**{k: v for k, v in named.items() if v is not None}, **kwargs)

    @torch.no_grad()
    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """The base's ``generate`` (its KV cache and decoding), with this folder's generation config."""
        self.base.generation_config = self.generation_config
        return self.base.generate(*args, **kwargs)
