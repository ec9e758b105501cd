"""One injection layer's computation — ``Δ_t = a_t · s ⊙ Σ_{i∈K} g_i e_i``, clipped to ``||Δ_t|| <= κ ||h_t||``, on
the positions :mod:`.positions` marks. :class:`.plugin.ToEPlugin` holds one per injection layer and adds their Δ to
the base's residual stream through forward hooks."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from .bank import ExpertBank
from .config import ToEConfig, ToEError
from .tree import RouteOutput, TreeGate


class Record(NamedTuple):
    """What one injection layer did in the last forward: its route, mask (B, T) and mean ||Δ|| / ||h||."""

    route: RouteOutput
    mask: torch.Tensor
    delta_ratio: torch.Tensor


class InjectionLayer(nn.Module):
    """Gate, bank and scale for one decoder layer."""

    def __init__(self, config: ToEConfig, bank: ExpertBank):
        super().__init__()
        if bank.num_leaves != config.num_leaves or bank.direction.shape[1] != config.hidden_size:
            raise ToEError(
                f"bank is {tuple(bank.direction.shape)} but the config asks for ({config.num_leaves}, "
                f"{config.hidden_size}): rebuild the bank or fix num_leaves/hidden_size"
            )
        self.gate = TreeGate(
            config.hidden_size,
            config.num_leaves,
            config.shape,
            config.gate_rank,
            config.selection,
            config.top_k,
            config.top_p,
            config.intensity,
            config.query_norm,
        )
        self.bank = bank
        self.scale = nn.Parameter(torch.zeros(config.hidden_size))  # zero-init: exact no-op until trained
        self.clip = config.clip

    def mapped_parameters(self) -> list[nn.Parameter]:
        """The parameters read from a map of the plug-in file (``ToEPlugin.load(mmap=True)``), which stay frozen."""
        if not self.bank.mapped:
            return []
        return [self.bank.direction, self.bank.norm, self.gate.nodes.weight, self.gate.nodes.bias]

    def forward(
        self, h: torch.Tensor, mask: torch.Tensor, selection: str | None = None
    ) -> tuple[torch.Tensor, RouteOutput]:
        """Δ for hidden states ``h`` (B, T, D) where ``mask`` (B, T) is 1; returns (Δ (B, T, D) float32, route)."""
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.mapped_parameters()):
            raise ToEError("the bank and gate nodes of this plug-in are mapped from its file and cannot train: load it "
                           "with mmap=False (ToEModel.from_pretrained(..., mmap_bank=False)) to train them")
        route = self.gate(h, selection)
        dense = (selection or self.gate.selection) == "dense"
        return self.bank.delta(route, dense, self.scale, h, self.clip, mask), route
