"""`toe report`: one table (markdown + JSON) and a plot from saved `toe eval` folders.

Eval folders that scored the same items with the same CE target are pooled into one table: the bare base and the
teacher are taken once, every other system (ToE, a baseline's plug-in, LoRA) is one row labelled by its folder,
and each row carries the gap closed against the pooled base and teacher plus its paired difference from a
reference system (ToE by default) on the same items. So a baseline evaluated in its own folder without the teacher
still gets a gap-closed figure, and "ToE minus the no-teacher control" is a column, not a hand calculation
(:mod:`tree_of_experts.evaluation.tables` builds them)."""

from __future__ import annotations

import os

from ..errors import ToEError
from ..evaluation.tables import (
    leaf_usage,
    markdown,
    paired_rows,
    pairs_markdown,
    plot,
    pool,
    resolve_pairs,
    sweep_plot,
    table_rows,
    usage_plot,
)
from ..files import atomic_write_json, atomic_write_text
from ..folders import claim_out
from ..locks import releases_out_locks


@releases_out_locks
def report(run_dirs: list[str], out: str = "report", reference: str | None = None,
           labels: dict[str, str] | None = None, pairs: list[str] | None = None, overwrite: bool = False) -> dict:
    """Pools `toe eval` folders into one table of CE and accuracy, with paired differences.

    Writes ``out/report.md``, ``out/report.json`` and ``out/report.png``; ``out/sweep.png`` (CE and accuracy vs N
    and K) when the labels name at least three values of N or K, and ``out/usage.png`` + ``out/leaf_usage.json``
    (each plug-in's leaf usage) when the folders recorded it.

    Args:
        run_dirs: folders written by `toe eval` (each has metrics.json and one JSONL per system).
        out: output folder.
        reference: system label the paired-difference columns compare against (default: the ToE row).
        labels: {folder or folder name: label} for the non-anchor system of a folder (default: the folder name).
        pairs: more paired comparisons, each "A:B" (two system labels): A minus B item by item on every target
            where both were scored, in report.md and pairs.json (e.g. a ToE row against the control at its layer
            set, or against LoRA trained with the same objective; "X:base" on held-out code is what X costs there).
        overwrite: replace another command's files in ``out``; a previous report there is replaced without it.
    """
    run_dirs = [run_dirs] if isinstance(run_dirs, str) else run_dirs  # one folder given as a string (Python)
    pairs = pairs.split(",") if isinstance(pairs, str) else pairs
    if not run_dirs:
        raise ToEError("no eval folders given: pass the `toe eval` folders to pool (toe report DIR [DIR ...])")
    claim_out(out, "report", overwrite=overwrite, inputs={f"run_dirs[{i}]": d for i, d in enumerate(run_dirs)})
    groups = pool(run_dirs, labels)
    known = sorted({label for systems in groups.values() for label in systems})
    if reference is not None and reference not in known:
        raise ToEError(f"--reference {reference!r} is none of the pooled systems: use one of {', '.join(known)}")
    pair_list = resolve_pairs(pairs or [], groups)
    rows = table_rows(groups, reference)
    paired = paired_rows(groups, pair_list)
    for a, b in pair_list:
        if not any(r["a"] == a and r["b"] == b for r in paired):
            where = {x: [t for t, systems in groups.items() if x in systems] for x in (a, b)}
            raise ToEError(f"--pairs {a}:{b}: the two were never scored on the same items ({a}: {where[a]}; {b}: "
                           f"{where[b]}): pair systems of one target")
    for name in ("pairs.json", "leaf_usage.json", "usage.png", "sweep.png"):  # a previous report's, not this one's
        if os.path.isfile(os.path.join(out, name)):
            os.remove(os.path.join(out, name))
    usage = leaf_usage(run_dirs, labels)
    text = markdown(rows)
    if paired:
        text += "\n" + pairs_markdown(paired)
    if usage:
        text += ("\n**Leaf usage at inference** (share of the selection mass over every scored token; effective "
                 "leaves = exp(entropy); mean ‖Δ‖/‖h‖: how hard the plug-in pushes the residual stream there)\n\n"
                 "| system | scored on | layer | effective leaves | most used leaf's share | mean ‖Δ‖/‖h‖ |"
                 "\n|---|---|---|---|---|---|\n")
        text += "".join(f"| {u['system']} | {u['target']} | {u['layer']} | {u['effective_leaves']:.1f} of "
                        f"{len(u['usage'])} | {100 * max(u['usage']):.1f} % | "
                        f"{format(u['delta_ratio'], '.4f') if 'delta_ratio' in u else '–'} |\n" for u in usage)
    os.makedirs(out, exist_ok=True)
    atomic_write_json(os.path.join(out, "report.json"), rows)
    if paired:
        atomic_write_json(os.path.join(out, "pairs.json"), paired)
    atomic_write_text(os.path.join(out, "report.md"), text)
    plot(rows, os.path.join(out, "report.png"))
    result = {"rows": len(rows), "markdown": os.path.join(out, "report.md"), "plot": os.path.join(out, "report.png")}
    if usage:
        atomic_write_json(os.path.join(out, "leaf_usage.json"), usage)
        usage_plot(usage, os.path.join(out, "usage.png"))
        result["usage_plot"] = os.path.join(out, "usage.png")
    if sweep_plot(rows, os.path.join(out, "sweep.png")):
        result["sweep_plot"] = os.path.join(out, "sweep.png")
    return result
