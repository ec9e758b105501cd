"""Step helpers of the plug-in training loop: route supervision, usage and means over processes, the
finite-loss guard."""

from __future__ import annotations

import math

import torch

from ..errors import ToEError
from ..extraction.store import route_key
from ..tree import RouteOutput, num_nodes, path_labels, route_loss, usage


def flush_denormals() -> None:
    """Treats subnormal floats as zero on this CPU thread (FTZ/DAZ). A trained model's softmax can put ~1e-39
    probabilities on much of a 152k vocabulary; the gradient through the output projection then multiplies
    subnormal numbers, which this x86 CPU runs ~100x slower (`runs/denormal_check.py`). Values below 1.2e-38
    change no fp32 sum they enter. Called by `toe` and the training loops; a no-op where unsupported."""
    torch.set_flush_denormal(True)


def node_levels(shape: str, num_leaves: int) -> torch.Tensor:
    """(M,) depth of each internal node: heap level for balanced trees, the node index for deep ones, 0 for flat."""
    m = torch.arange(num_nodes(shape, num_leaves))
    if shape == "flat":
        return torch.zeros_like(m)
    return torch.log2(m.float() + 1).floor().long() if shape == "balanced" else m


def level_accuracy(node_accuracy: torch.Tensor, levels: torch.Tensor) -> list[float]:
    """Mean per-node routing accuracy at each level (NaN-free: nodes no token visits are skipped)."""
    out = []
    for lv in range(int(levels.max()) + 1):
        a = node_accuracy[levels == lv]
        a = a[~torch.isnan(a)]
        out.append(round(float(a.mean()), 4) if len(a) else float("nan"))
    return out


def sampled_route_loss(gate, route_data: dict[str, torch.Tensor], layer: int, n: int, g: torch.Generator,
                       device: torch.device, closed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Route BCE of ``gate`` on ``n`` cached base states drawn with ``g``; nodes where ``closed`` (M,) is True are
    left out (Stage A opens levels top-down). Returns (loss, per-node accuracy)."""
    states, leaf = route_data[route_key("states", layer)], route_data[route_key("leaf", layer)]
    pick = torch.randint(len(leaf), (n,), generator=g)
    labels = path_labels(gate.shape, gate.num_leaves, leaf[pick]).to(device)
    if closed is not None:
        labels[:, closed] = -1
    return route_loss(gate(states[pick].to(device).float()[None], "dense"), labels[None])


def global_usage(route: RouteOutput, mask: torch.Tensor, accel) -> torch.Tensor:
    """Leaf usage (N,) over the injected tokens of *every* process, so the usage regulariser of P processes is the
    one process's. The value is the all-reduced mean; the gradient flows through this process's tokens, scaled by P
    because DDP averages gradients over processes. One process: exactly :func:`tree_of_experts.tree.usage`."""
    if accel.num_processes == 1:
        return usage(route, mask)
    m = mask.to(route.leaf_logp.dtype)[..., None]  # (B, T, 1)
    mass = (route.leaf_logp.exp() * m).flatten(0, -2).sum(0)  # (N,) this process's routing mass
    total = accel.reduce(torch.cat([mass.detach(), m.sum()[None].detach()]), reduction="sum")  # (N + 1,)
    p = accel.num_processes
    mass = p * mass - (p - 1) * mass.detach() + (total[:-1] - mass.detach())  # value: every process's mass
    return mass / total[-1].clamp_min(1.0)


def global_mean(accel, values: dict[str, float | None]) -> dict[str, float | None]:
    """Per-process values normalised by the global token count, averaged over processes: the global values (what
    rank 0 logs). None stays None; one all-reduce, none on one process."""
    keys = [k for k, v in values.items() if v is not None]
    if accel.num_processes == 1 or not keys:
        return values
    mean = accel.reduce(torch.tensor([values[k] for k in keys], dtype=torch.float64, device=accel.device), "mean")
    return {**values, **dict(zip(keys, mean.tolist()))}


def finite_loss(accel, loss: torch.Tensor, step: int, stage: str) -> float:
    """The step's global loss; a NaN or inf one stops training before the optimizer applies it (every process sees
    the same global value and stops together), so no checkpoint or plug-in is written from that state."""
    value = global_mean(accel, {"loss": loss.item()})["loss"]
    if not math.isfinite(value):
        raise ToEError(f"training stopped at step {step} (stage {stage}): the loss is {value}; nothing was saved from "
                       "this state (earlier checkpoints are intact): lower the learning rates (--lr, --scale_lr, "
                       "--bank_lr, --stage_a_lr) and start again with --overwrite")
    return value
