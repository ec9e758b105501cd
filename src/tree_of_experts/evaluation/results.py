"""Evaluation results: a system's summary (accuracy and CE with intervals, sampling metrics, leaf usage), paired
comparisons against the base and the teacher, and the per-example/metrics files of an eval folder. `toe eval`,
`toe oracle`, `toe traces` and `toe report` share them."""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from ..data import read_jsonl
from ..errors import ToEError
from ..files import atomic_write_json, atomic_write_text, dumps
from ..stats import bootstrap_mean, finite_values, gap_closed_ci, nonfinite_count, paired_bootstrap, wilson
from ..tree import effective_leaves
from .tasks import STOP


def usage_summary(mass: dict[int, torch.Tensor], delta_ratio: dict[int, float] | None = None) -> dict[str, dict]:
    """{layer: share of the selection mass per leaf, effective leaves = exp(entropy of that share) and, when given,
    the mean ||Δ|| / ||h|| over the scored tokens}."""
    return {str(layer): {"usage": (m / m.sum().clamp_min(1e-12)).tolist(),
                         "effective_leaves": effective_leaves(m).item(),
                         **({"delta_ratio": delta_ratio[layer]} if delta_ratio and layer in delta_ratio else {})}
            for layer, m in mass.items()}


def summarize(rows: list[dict]) -> dict[str, Any]:
    out: dict[str, Any] = {"n": len(rows)}
    if rows and "correct" in rows[0]:
        k = sum(r["correct"] for r in rows)
        out["accuracy"] = k / len(rows)
        out["accuracy_ci95"] = list(wilson(k, len(rows)))
        out["mean_completion_tokens"] = sum(r["tokens"] for r in rows) / len(rows)
        if "truncated" in rows[0]:  # rows written before the flag existed have none
            out["truncated_share"] = sum(r["truncated"] for r in rows) / len(rows)
    if rows and "samples" in rows[0]:  # k sampled completions per item
        k = len(rows[0]["samples"])
        out["num_samples"] = k
        out["pass@1"] = sum(s["correct"] for r in rows for s in r["samples"]) / (k * len(rows))
        for key, field in ((f"maj@{k}", "maj_correct"), (f"pass@{k}", "pass")):
            hits = sum(r[field] for r in rows)
            out[key], out[f"{key}_ci95"] = hits / len(rows), list(wilson(hits, len(rows)))
    if rows and "ce" in rows[0]:
        values = finite_values(rows, "ce")
        if values is None:  # NaN/inf on some item (a diverged plug-in, fp16 overflow): flagged, never averaged
            out["ce"], out["ce_ci95"], out["ce_token_weighted"] = None, [None, None], None
            out["ce_nonfinite"] = nonfinite_count(rows, "ce")
            return out
        mean, lo, hi = bootstrap_mean(values)
        out["ce"], out["ce_ci95"] = mean, [lo, hi]
        tokens = sum(r["ce_tokens"] for r in rows)
        out["ce_token_weighted"] = sum(r["ce"] * r["ce_tokens"] for r in rows) / max(tokens, 1)
        if "cut_by_max_length" in rows[0]:  # rows written before the flag existed have none
            out["ce_cut_by_max_length"] = sum(r["cut_by_max_length"] for r in rows)
    return out


def write_rows(out: str, system: str, rows: list[dict]) -> None:
    atomic_write_text(os.path.join(out, f"{system}.jsonl"), "".join(dumps(r) + "\n" for r in rows))


def write_metrics(out: str, args: dict, per_system: dict[str, list[dict]], leaf_usage: dict | None = None) -> dict:
    """``out/metrics.json``: the run's arguments, each system's summary, comparisons and (for a plug-in) leaf usage
    over every scored and generated token."""
    metrics = {"args": args, "systems": {k: summarize(v) for k, v in per_system.items()}}
    metrics["comparisons"] = compare(per_system)
    if leaf_usage:
        metrics["leaf_usage"] = leaf_usage
    atomic_write_json(os.path.join(out, "metrics.json"), metrics)
    return metrics


def _interval(value, ci, scale: float = 1.0, digits: int = 3, signed: bool = False) -> str:
    """``value [lo, hi]`` (``scale``: 100 for percentages), "–" when there is no value."""
    if value is None:
        return "–"
    f = f"{{:{'+' if signed else ''}.{digits}f}}".format
    lo, hi = ci or (None, None)
    return f(scale * value) + (f" [{f(scale * lo)}, {f(scale * hi)}]" if lo is not None and hi is not None else "")


def summary_table(metrics: dict, out: str) -> str:
    """One screen of ``metrics``, what `toe eval` prints: each system's accuracy and CE with 95 % intervals, each
    system's paired difference from the base and its share of the base-teacher gap, and where the rest is."""
    systems = metrics["systems"]
    lines = [f"{'system':<10} {'n':>5}  {'accuracy % [95 % CI]':<24} {'CE [95 % CI]':<26} more"]
    for name, m in systems.items():
        more = []
        if m.get("truncated_share"):
            more.append(f"out of tokens {100 * m['truncated_share']:.0f} %")
        k = m.get("num_samples")
        if k:
            more.append(f"pass@1 {100 * m['pass@1']:.1f} %, maj@{k} {100 * m[f'maj@{k}']:.1f} %, "
                        f"pass@{k} {100 * m[f'pass@{k}']:.1f} %")
        if m.get("ce_nonfinite"):
            more.append(f"CE not finite on {m['ce_nonfinite']} items")
        lines.append(f"{name:<10} {m['n']:>5}  {_interval(m.get('accuracy'), m.get('accuracy_ci95'), 100, 1):<24} "
                     f"{_interval(m.get('ce'), m.get('ce_ci95')):<26} {'; '.join(more)}".rstrip())
    for name, c in metrics.get("comparisons", {}).items():
        parts = []
        for metric, scale, digits, unit in (("ce", 1, 4, " nats"), ("accuracy", 100, 1, " pts")):
            d = c.get(f"{metric}_vs_base")
            if d:
                parts.append(f"{metric} {_interval(d['mean_diff'], d['ci95'], scale, digits, signed=True)}{unit}")
        for metric in ("ce", "accuracy"):
            g = c.get(f"{metric}_gap_closed")
            if g and g.get("gap_closed") is not None:
                parts.append(f"{metric} gap closed {_interval(g['gap_closed'], g['ci95'], 100, 1)} %")
        if parts:
            lines.append(f"{name} minus base, same items: " + "; ".join(parts))
    lines.append(f"Full metrics (intervals, comparisons, leaf usage, arguments): {os.path.join(out, 'metrics.json')}; "
                 f"per-item rows: {os.path.join(out, '<system>.jsonl')}")
    return "\n".join(lines)


def compare(per_system: dict[str, list[dict]]) -> dict:
    """Paired differences vs the base and gap closed vs the teacher, on the same items."""
    out: dict[str, Any] = {}
    base = per_system.get("base")
    teacher = per_system.get("teacher")
    for name, rows in per_system.items():
        if name in ("base", "teacher") or base is None:
            continue
        c: dict[str, Any] = {}
        for metric, key in (("ce", "ce"), ("accuracy", "correct")):
            if key not in rows[0]:
                continue
            s, b = finite_values(rows, key), finite_values(base, key)
            t = finite_values(teacher, key) if teacher is not None else None
            if s is None or b is None:  # a non-finite value: no comparison (summarize flags it)
                continue
            c[f"{metric}_vs_base"] = paired_bootstrap(s, b)
            if t is not None:
                c[f"{metric}_gap_closed"] = gap_closed_ci(s, b, t)
        out[name] = c
    return out


def teacher_answers(folder: str, items: list, max_new_tokens: int) -> list[dict]:
    """The teacher's graded answers from an eval folder, checked to be for these prompts and this budget."""
    rows_file, metrics_file = os.path.join(folder, "teacher.jsonl"), os.path.join(folder, "metrics.json")
    if not (os.path.isfile(rows_file) and os.path.isfile(metrics_file)):
        raise ToEError(f"{folder} holds no teacher answers: pass a `toe eval --teacher ... --accuracy true` folder")
    with open(metrics_file) as f:
        args = json.load(f)["args"]
    if not args.get("accuracy", True):
        raise ToEError(f"{folder} scored CE only, no teacher answers: pass a `toe eval --teacher ... --accuracy true` "
                       "folder")
    if args.get("max_new_tokens") != max_new_tokens:
        raise ToEError(f"{folder} generated with --max_new_tokens {args.get('max_new_tokens')}: pass "
                       f"--max_new_tokens {args.get('max_new_tokens')}")
    by_prompt = {row["prompt"]: row for row in read_jsonl(rows_file)}
    missing = [i for i, it in enumerate(items) if it.prompt not in by_prompt]
    if missing:
        raise ToEError(f"{folder} has no teacher answer for {len(missing)} of these prompts (first: row "
                       f"{missing[0]}): use the data, --skip/--limit and --template it was generated with")
    return [by_prompt[it.prompt] for it in items]


def teacher_accuracy_args(task: str, data: str, teacher: str, limit: int | None, skip: int, few_shot: int,
                          template: str, max_new_tokens: int) -> dict:
    """The ``args`` of an accuracy-only eval folder holding the teacher's greedy answers."""
    return dict(base=None, task=task, data=data, teacher=teacher, limit=limit, skip=skip, few_shot=few_shot,
                template=template, max_new_tokens=max_new_tokens, decoding="greedy", stop=STOP, ce=False,
                accuracy=True)
