"""The option groups the commands share: typed, frozen dataclasses whose fields carry their own documentation.

A command takes each group as one parameter (``train(base, experts, data, out, loss=Loss(beta=0.3))``); the CLI
shows a group's fields as nested options (``--loss.beta 0.3``, with the fields' docstrings as help), and YAML configs
nest them the same way (``loss: {beta: 0.3}``). Every option is declared once, in this package, with its choices as a
``Literal``; a value out of range is refused with one line (:class:`tree_of_experts.errors.ToEError`) when the
group is built. The flat spellings of earlier releases keep working: ``train(..., beta=0.3)`` in Python and
``--beta 0.3`` on the command line are routed to the group that declares the field (:func:`grouped`).

The groups live by job in :mod:`.training`, :mod:`.extraction` and :mod:`.evaluation`; :mod:`.base` holds what
makes a group and how commands take them. Every public name is importable from here.
"""

from __future__ import annotations

from .base import (
    DEFAULT_TEMPLATE,
    DType,
    Objective,
    OptionGroup,
    flat_args,
    flat_defaults,
    grouped,
    option_names,
    refuse_unused,
    require,
    unused,
)
from .evaluation import (
    ORACLE_ROWS,
    SAMPLING,
    Pipeline,
    Prompts,
    Scoring,
    Sweeps,
    Systems,
    Workload,
)
from .extraction import (
    Capture,
    Disk,
    Fusion,
    Tree,
)
from .training import (
    ACCELERATE_PLACES,
    TRAINING_ONLY,
    Fit,
    Loss,
    Runtime,
    Schedule,
    Text,
)

GROUPS = (Text, Schedule, Loss, Fit, Runtime, Tree, Capture, Fusion, Disk, Systems, Scoring, Prompts, Workload,
          Sweeps, Pipeline)  # every option group: a field name is declared in one of them only


__all__ = [
    "ACCELERATE_PLACES",
    "Capture",
    "DEFAULT_TEMPLATE",
    "DType",
    "Disk",
    "Fit",
    "Fusion",
    "GROUPS",
    "Loss",
    "ORACLE_ROWS",
    "Objective",
    "OptionGroup",
    "Pipeline",
    "Prompts",
    "Runtime",
    "SAMPLING",
    "Schedule",
    "Scoring",
    "Sweeps",
    "Systems",
    "TRAINING_ONLY",
    "Text",
    "Tree",
    "Workload",
    "flat_args",
    "flat_defaults",
    "grouped",
    "option_names",
    "refuse_unused",
    "require",
    "unused",
]
