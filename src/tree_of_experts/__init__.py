"""Tree-of-Experts: a tree-gated bank of teacher-derived expert vectors plugged into a frozen small LM."""

from __future__ import annotations

__version__ = "0.1.0"

from .bank import ExpertBank
from .config import ToEConfig, ToEError
from .model import ToEModel, freeze, new_config
from .plugin import InjectionLayer, ToEPlugin
from .tree import RouteOutput, TreeGate

__all__ = [
    "ExpertBank",
    "InjectionLayer",
    "RouteOutput",
    "ToEConfig",
    "ToEError",
    "ToEModel",
    "ToEPlugin",
    "TreeGate",
    "freeze",
    "new_config",
]
