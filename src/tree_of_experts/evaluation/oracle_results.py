"""`toe oracle`'s results: every row's CE with intervals and gap closed (oracle.json), the graded greedy answers
(generation.jsonl), oracle.md, and the CE rows in `toe eval`'s layout under the short names of ``SLUGS`` (one JSONL
per system and metrics.json), so that `toe report` pools them with `toe eval` folders."""

from __future__ import annotations

import json
import math
import os

from ..files import atomic_write_text
from ..grading import grade
from ..stats import MIN_INTERVAL_N, bootstrap_mean, gap_closed_ci, wilson
from .results import write_metrics, write_rows

SLUGS = {"base": "base", "teacher": "teacher", "O1 trained map": "O1-map", "O2 oracle routing": "O2-routing",
         "static vector": "static-mean", "ToE (learned)": "toe", "predicted δ̂(h): ridge": "predicted-ridge",
         "predicted δ̂(h): MLP": "predicted-mlp"}  # file names of the eval-format rows


def _pct(x: float) -> str:
    return f"{100 * x:.0f} %"


def _nats(x: float) -> str:
    return f"{x:.4f}"


def _interval(point: float | None, ci: list | None, fmt) -> str:
    """``point [lo, hi]``; non-finite or interval-less values are said so, never printed as "nan [nan, nan]"."""
    if point is None or not math.isfinite(point):
        return "non-finite"
    lo, hi = ci or (None, None)
    if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
        return f"{fmt(point)} (no interval below {MIN_INTERVAL_N} items)"
    return f"{fmt(point)} [{fmt(lo)}, {fmt(hi)}]"


def _slug(name: str) -> str:
    return SLUGS.get(name) or name.replace("O1 ridge λ=", "O1-ridge-")


def write_eval_folder(out: str, per_item: dict, systems: dict, prompts: list[str], golds: list[str],
                       args: dict) -> None:
    """The CE rows in `toe eval`'s layout (one JSONL per system, metrics.json), for `toe report` to pool."""
    per_system = {}
    for name, values in per_item.items():
        per_system[_slug(name)] = [{"system": _slug(name), "prompt": p, "gold": g, "ce": ce, "ce_tokens": n}
                                   for p, g, ce, (_, n) in zip(prompts, golds, values, systems[name])]
        write_rows(out, _slug(name), per_system[_slug(name)])
    write_metrics(out, {**args, "source": "toe oracle"}, per_system)


def ce_result(per_item: dict[str, list[float]], n_items: int, data: str, skip: int, limit: int | None,
              ce_target: str, o2_signal: dict, fit: dict | None) -> dict:
    """oracle.json without the generation: every row's mean CE per item and gap closed with 95 % intervals (the
    signal O2 routes by, ``o2_signal``), and the predictability fit where it ran (``fit``)."""
    result = {"items": n_items, "data": data, "skip": skip, "limit": limit, "ce_target": ce_target,
              "o2_signal": o2_signal, "systems": {}}
    if fit is not None:
        result["predictability"] = fit
    for name, values in per_item.items():
        mean, lo, hi = bootstrap_mean(values)
        entry = {"ce": mean, "ce_ci95": [lo, hi]}
        if name not in ("base", "teacher"):
            entry["gap_closed"] = gap_closed_ci(values, per_item["base"], per_item["teacher"])
        result["systems"][name] = entry
    return result


def graded_answers(out: str, task: str, completions: dict[str, list[str]], golds: list[str]) -> dict:
    """The greedy answers graded against ``golds``: accuracy and gap closed per system (oracle.json's
    ``generation``); every answer goes to generation.jsonl."""
    graded = {name: [grade(task, c, g) for c, g in zip(texts, golds)] for name, texts in completions.items()}
    correct = {name: [float(ok) for _, ok in g] for name, g in graded.items()}
    generation = {}
    for name in ("base", "teacher", "ToE (learned)", "O1 trained map"):
        if name not in correct:
            continue
        k = int(sum(correct[name]))
        entry = {"accuracy": k / len(golds), "accuracy_ci95": list(wilson(k, len(golds)))}
        if name not in ("base", "teacher"):
            entry["gap_closed"] = gap_closed_ci(correct[name], correct["base"], correct["teacher"])
        generation[name] = entry
    atomic_write_text(os.path.join(out, "generation.jsonl"), "".join(
        json.dumps({"system": name, "item": i, "completion": c, "extracted": graded[name][i][0],
                    "gold": golds[i], "correct": graded[name][i][1]}) + "\n"
        for name, texts in completions.items() for i, c in enumerate(texts)))
    return generation


def markdown(result: dict) -> str:
    """oracle.md: the CE table, the predictability fit and the greedy generation's table, where they ran."""
    lines = ["| system | CE nats [95 % CI] | gap closed [95 % CI] |", "|---|---|---|"]
    for name, e in result["systems"].items():
        g = e.get("gap_closed")
        gap = "–" if not g or g["gap_closed"] is None else _interval(g["gap_closed"], g["ci95"], _pct)
        lines.append(f"| {name} | {_interval(e['ce'], e['ce_ci95'], _nats)} | {gap} |")
    if "predictability" in result:
        lines += ["", "| layer | held-out R² of δ from h: ridge | MLP | the mean's share of δ's energy | tokens "
                      "(train / held out) |", "|---|---|---|---|---|"]
        lines += [f"| {layer} | {e['r2_ridge']:.3f} | {e.get('r2_mlp', float('nan')):.3f} | {e['mean_share']:.3f} | "
                  f"{e['train_tokens']} / {e['heldout_tokens']} |" for layer, e in result["predictability"].items()]
    if "generation" in result:
        lines += ["", "| greedy generation | accuracy [95 % CI] | gap closed [95 % CI] |", "|---|---|---|"]
        for name, e in result["generation"].items():
            g = e.get("gap_closed")
            gap = "–" if not g or g["gap_closed"] is None else _interval(g["gap_closed"], g["ci95"], _pct)
            lines.append(f"| {name} | {_interval(e['accuracy'], e['accuracy_ci95'], _pct)} | {gap} |")
    return "\n".join(lines) + "\n"
