"""Randomly initialised models at real sizes, for `toe bench --shapes BASE:TEACHER`: the seed's setting (a 1.5B/3B
base, a 7B/32B teacher) measured without downloading a weight.

A shape is a transformers config: one shipped in ``assets/shapes`` by name (``qwen2.5-1.5b``, ``qwen2.5-3b``,
``deepseek-r1-distill-qwen-7b``, ``deepseek-r1-distill-qwen-32b``), or any ``config.json`` (or a folder holding
one). Speed and memory of a transformer depend on its widths, depth and vocabulary, not on its weights' values, so a
random model of the real config times what the real one would. ``num_layers`` cuts the depth (same widths) so a CPU
finishes in minutes; every per-layer cost then scales with depth, which the bench records.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import torch

from .errors import ToEError

SHAPES_DIR = os.path.join(os.path.dirname(__file__), "assets", "shapes")


def shipped_shapes() -> list[str]:
    return sorted(f[: -len(".json")] for f in os.listdir(SHAPES_DIR) if f.endswith(".json"))


def shape_config(name: str) -> Any:
    """The transformers config of a shipped shape name, a ``config.json`` or a folder holding one."""
    from transformers import AutoConfig

    path = os.path.join(SHAPES_DIR, f"{name}.json")
    if not os.path.exists(path):
        path = os.path.join(name, "config.json") if os.path.isdir(name) else name
    if not os.path.isfile(path):
        raise ToEError(f"shape {name!r}: not a shipped shape ({', '.join(shipped_shapes())}) nor a config.json or a "
                       "folder holding one")
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ToEError(f"shape {name!r}: {path} is not a transformers config ({str(e).splitlines()[0]})") from None


def parse_shapes(spec: str) -> tuple[Any, Any]:
    """``BASE:TEACHER`` -> (base config, teacher config), both checked before anything is built."""
    base, sep, teacher = spec.rpartition(":") if spec.count(":") > 1 else spec.partition(":")
    if not sep or not base or not teacher:
        raise ToEError(f"--shapes {spec!r}: give BASE:TEACHER, e.g. qwen2.5-1.5b:deepseek-r1-distill-qwen-7b")
    return shape_config(base), shape_config(teacher)


def cut_depth(config: Any, num_layers: int | None) -> Any:
    """A copy of ``config`` with ``num_layers`` decoder layers (None: as given); per-layer lists follow."""
    config = copy.deepcopy(config)
    if num_layers is None or num_layers >= config.num_hidden_layers:
        return config
    if num_layers < 1:
        raise ToEError(f"--shape_layers {num_layers}: give at least 1")
    config.num_hidden_layers = num_layers
    if getattr(config, "max_window_layers", None) is not None:
        config.max_window_layers = min(config.max_window_layers, num_layers)
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = config.layer_types[:num_layers]
    return config


def random_model(config: Any, dtype: torch.dtype, device: torch.device, seed: int = 0) -> torch.nn.Module:
    """A causal LM of ``config`` with random weights, built on ``device`` in ``dtype`` (eval mode)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def injection_layers(num_layers: int) -> list[int]:
    """Three injection layers at a quarter, half and three quarters of the depth (the real-pair study's 5, 11, 17
    of 24 are near these), fewer when the cut depth has fewer layers."""
    return sorted({max(0, round(f * num_layers) - 1) for f in (0.25, 0.5, 0.75)})


def capture_bytes_per_token(base_widths: list[int], teacher_widths: list[int], topk: int, kd: bool = True) -> int:
    """Bytes per token of an extraction shard (the formula of docs/scale.md): fp16 base and teacher states at every
    injection layer, int64 ids and example index, uint8 masks, and with KD the teacher's fp32 NLL and top-k (int32
    ids, fp16 log-probs)."""
    states = 2 * (sum(base_widths) + sum(teacher_widths))
    per_token = 8 + 1 + 1 + 8  # input_ids, loss_mask, valid, example
    return states + per_token + ((4 + 4 * topk + 2 * topk) if kd else 0)


def parameter_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())
