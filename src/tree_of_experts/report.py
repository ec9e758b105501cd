"""`toe report`: one table (markdown + JSON) and plots from saved eval runs."""

from __future__ import annotations

import json
import os

from .config import ToEError
from .io import atomic_write_json, atomic_write_text


def _fmt(x, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.0f} %"


def load_runs(run_dirs: list[str]) -> list[tuple[str, dict]]:
    runs = []
    for d in run_dirs:
        path = os.path.join(d, "metrics.json")
        if not os.path.isfile(path):
            raise ToEError(f"{path} not found: pass folders written by `toe eval`")
        with open(path) as f:
            runs.append((os.path.basename(os.path.normpath(d)), json.load(f)))
    return runs


def table_rows(runs: list[tuple[str, dict]]) -> list[dict]:
    rows = []
    for run, m in runs:
        for system, s in m["systems"].items():
            c = m.get("comparisons", {}).get(system, {})
            ce_gap = c.get("ce_gap_closed", {})
            acc_gap = c.get("accuracy_gap_closed", {})
            rows.append({
                "run": run, "system": system, "n": s["n"],
                "accuracy": s.get("accuracy"), "accuracy_ci95": s.get("accuracy_ci95"),
                "ce": s.get("ce"), "ce_ci95": s.get("ce_ci95"),
                "ce_gap_closed": ce_gap.get("gap_closed"), "ce_gap_closed_ci95": ce_gap.get("ci95"),
                "ce_gap_defined": ce_gap.get("defined"),
                "accuracy_gap_closed": acc_gap.get("gap_closed"), "accuracy_gap_closed_ci95": acc_gap.get("ci95"),
                "accuracy_gap_defined": acc_gap.get("defined"),
                "format_adaptation": bool(ce_gap.get("format_adaptation_flag")),
            })
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| run | system | n | accuracy [95 % CI] | CE nats [95 % CI] | CE gap closed [95 % CI] | acc. gap closed |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        acc = "–" if r["accuracy"] is None else (
            f"{_pct(r['accuracy'])} [{_pct(r['accuracy_ci95'][0])}, {_pct(r['accuracy_ci95'][1])}]")
        ce = "–" if r["ce"] is None else f"{_fmt(r['ce'])} [{_fmt(r['ce_ci95'][0])}, {_fmt(r['ce_ci95'][1])}]"
        gap = "–"
        if r["ce_gap_closed"] is not None:
            lo, hi = r["ce_gap_closed_ci95"] or [None, None]
            gap = f"{_pct(r['ce_gap_closed'])} [{_pct(lo)}, {_pct(hi)}]"
            if r["format_adaptation"]:
                gap += " (>100 %: format adaptation, not transfer)"
            if not r["ce_gap_defined"]:
                gap += " (gap not significant)"
        agap = "–"
        if r["accuracy_gap_closed"] is not None:
            agap = _pct(r["accuracy_gap_closed"]) + ("" if r["accuracy_gap_defined"] else " (undefined: no gap)")
        lines.append(f"| {r['run']} | {r['system']} | {r['n']} | {acc} | {ce} | {gap} | {agap} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, key, title in ((axes[0], "ce", "response CE (nats, lower is better)"),
                           (axes[1], "accuracy", "answer accuracy")):
        shown = [r for r in rows if r[key] is not None]
        labels = [f"{r['run']}\n{r['system']}" if len({x['run'] for x in rows}) > 1 else r["system"] for r in shown]
        values = [r[key] for r in shown]
        ci = [r[f"{key}_ci95"] for r in shown]
        err = [[max(v - c[0], 0.0) for v, c in zip(values, ci)], [max(c[1] - v, 0.0) for v, c in zip(values, ci)]]
        ax.bar(range(len(values)), values, yerr=err, capsize=4, color="#4c72b0")
        ax.set_xticks(range(len(values)), labels, rotation=30, ha="right", fontsize=8)
        ax.set_title(title + " [95 % CI]")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def report(run_dirs: list[str], out: str = "report") -> dict:
    """Builds ``out/report.md``, ``out/report.json`` and ``out/report.png`` from `toe eval` folders.

    Args:
        run_dirs: folders written by `toe eval` (each has metrics.json).
        out: output folder.
    """
    rows = table_rows(load_runs(run_dirs))
    os.makedirs(out, exist_ok=True)
    atomic_write_json(os.path.join(out, "report.json"), rows)
    atomic_write_text(os.path.join(out, "report.md"), markdown(rows))
    plot(rows, os.path.join(out, "report.png"))
    return {"rows": len(rows), "markdown": os.path.join(out, "report.md"), "plot": os.path.join(out, "report.png")}
