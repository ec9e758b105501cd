"""Tree-of-Experts: a tree-gated bank of teacher-derived expert vectors plugged into a frozen small LM."""

from __future__ import annotations

__version__ = "0.1.0"

from .bank import ExpertBank
from .config import ToEConfig, ToEError
from .model import ToEModel, freeze
from .plugin_folder import new_config
from .plugin import InjectionLayer, ToEPlugin
from .tree import RouteOutput, TreeGate

try:  # registers the peft method TOE (peft_method.py); peft adds ~0.2 s to this import
    from .peft_method import ToEPeftConfig  # noqa: F401
except ImportError:  # a peft without register_peft_method or its state-dict hooks: ToEModel alone
    pass

# The commands as Python functions (`tree_of_experts.train(...)` is `toe train ...`), imported on first use so that
# `import tree_of_experts` stays light.
_COMMANDS = {"extract": "commands.extract", "rebuild": "commands.extract", "train": "commands.train",
             "evaluate": "commands.evaluate", "traces": "commands.evaluate", "eval_from_traces": "commands.evaluate",
             "report": "commands.report", "oracle": "commands.oracle", "bench": "commands.bench",
             "export": "commands.export", "generate": "commands.generate", "inspect": "commands.hub",
             "push": "commands.hub", "baseline": "recipes.baseline", "demo": "recipes.demo"}


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_COMMANDS))


def __getattr__(name: str):
    if name in _COMMANDS:
        import importlib

        return getattr(importlib.import_module(f".{_COMMANDS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
