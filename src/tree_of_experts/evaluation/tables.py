"""Tables and plots from `toe eval` folders: folders that scored the same items with the same CE target pooled into one
group (the bare base and the teacher taken once, every other system one row labelled by its folder), rows with the
gap closed against the pooled anchors and paired differences, and their markdown and plots. `toe report`, the demo
and the study scripts build on them."""

from __future__ import annotations

import json
import os
import re

from ..errors import ToEError
from ..stats import MIN_INTERVAL_N, finite_values, gap_closed_ci, paired_bootstrap
from .results import summarize

ANCHORS = ("base", "teacher")


def _fmt(x, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.0f} %"


def _target(args: dict) -> str:
    data = os.path.basename(args.get("data") or "?")
    skip, limit = args.get("skip") or 0, args.get("limit")
    # rows first–last, both included (a report of dev rows 56-155 reads "rows 56–155")
    items = f"rows {skip}–{skip + limit - 1}" if limit is not None else (f"rows {skip}–" if skip else "all rows")
    what = "accuracy" if args.get("ce") is False else f"{args.get('ce_target', 'gold_clean')} CE"
    # Sampled answers are another measurement than greedy ones: a folder that sampled them never pools with greedy
    # ones (a folder is one group, so its CE goes with it; a CE-only folder pools whatever its decoding settings)
    s = args.get("sampling") or {}
    sampled = args.get("accuracy") is not False and args.get("decoding") == "sample"
    decoding = (f" · sampled T={s.get('temperature', 1.0):g}, top-p {s.get('top_p', 1.0):g}, "
                f"k={s.get('num_samples', 1)}" if sampled else "")
    return f"{what} · {data} {items} · {args.get('few_shot', 0)}-shot{decoding}"


def pool(run_dirs: list[str], labels: dict[str, str] | None = None) -> dict[str, dict[str, list[dict]]]:
    """{target: {system label: per-item rows}} from `toe eval` folders; checks that pooled systems saw the same
    items. ``labels`` renames a folder's non-anchor system (default: the folder's name)."""
    labels = labels or {}
    groups: dict[str, dict[str, list[dict]]] = {}
    for d in run_dirs:
        path = os.path.join(d, "metrics.json")
        if not os.path.isfile(path):
            raise ToEError(f"{path} not found: pass folders written by `toe eval`")
        with open(path) as f:
            metrics = json.load(f)
        run = os.path.basename(os.path.normpath(d))
        group = groups.setdefault(_target(metrics["args"]), {})
        others = [s for s in metrics["systems"] if s not in ANCHORS]
        for system in metrics["systems"]:
            rows_path = os.path.join(d, f"{system}.jsonl")
            if not os.path.isfile(rows_path):
                raise ToEError(f"{rows_path} not found: the eval folder {d} is incomplete, rerun `toe eval`")
            if system in ANCHORS:
                label = system
                if label in group:
                    continue
            else:
                label = labels.get(d, labels.get(run, run))
                label = label if len(others) == 1 else f"{label}:{system}"
                if label in group:
                    raise ToEError(f"two eval folders give the system label {label!r}: rename one folder")
            with open(rows_path) as f:
                group[label] = [json.loads(line) for line in f]
        prompts = {lab: [r["prompt"] for r in rows] for lab, rows in group.items()}
        first = next(iter(prompts))
        for lab, p in prompts.items():
            if p != prompts[first]:
                raise ToEError(f"{lab!r} and {first!r} were evaluated on different items under one target "
                               "(same data, skip, limit, CE target): evaluate them on the same rows")
        # Same prompts but a different target text (a regenerated traces file, say) shows in the scored token
        # counts; the teacher is left out, its tokenizer may differ from the base's.
        counts = {lab: [r.get("ce_tokens") for r in rows] for lab, rows in group.items() if lab != "teacher"}
        counts = {lab: c for lab, c in counts.items() if None not in c}
        if counts:
            first = next(iter(counts))
            for lab, c in counts.items():
                if c != counts[first]:
                    raise ToEError(f"{lab!r} and {first!r} scored different target texts for the same prompts (a "
                                   "regenerated traces file, or a --max_length that cut long targets?): evaluate "
                                   "both on the same file with the same --max_length")
    return groups


def table_rows(groups: dict[str, dict[str, list[dict]]], reference: str | None = None) -> list[dict]:
    """One row per (target, system): accuracy and CE with 95 % intervals, gap closed vs the pooled base and
    teacher, and the paired difference from ``reference`` (default: the first system whose label starts with
    "toe" or "ToE")."""
    out = []
    for target, systems in groups.items():
        ref = reference
        if ref is None:  # the plug-in's row: a label starting with "toe", or a folder whose system is "toe"
            ref = next((s for s in systems if s.lower().startswith("toe")), None) or next(
                (s for s, rows in systems.items() if s not in ANCHORS and rows and rows[0].get("system") == "toe"),
                None)
        base, teacher = systems.get("base"), systems.get("teacher")
        order = [s for s in ANCHORS if s in systems] + [s for s in systems if s not in ANCHORS]
        for name in order:
            rows = systems[name]
            s = summarize(rows)
            row = {"target": target, "system": name, "n": s["n"], "accuracy": s.get("accuracy"),
                   "accuracy_ci95": s.get("accuracy_ci95"), "truncated_share": s.get("truncated_share"),
                   "ce": s.get("ce"), "ce_ci95": s.get("ce_ci95"), "ce_nonfinite": s.get("ce_nonfinite"),
                   "reference": ref if ref in systems and name != ref else None}
            for metric, key in (("ce", "ce"), ("accuracy", "correct")):
                if key not in rows[0]:
                    continue
                values = finite_values(rows, key)  # None: a NaN/inf item, flagged in the table, never compared
                b, t = (finite_values(x, key) if x is not None else None for x in (base, teacher))
                if values is not None and b is not None and t is not None and name not in ANCHORS:
                    row[f"{metric}_gap_closed"] = gap_closed_ci(values, b, t)
                other = finite_values(systems[ref], key) if row["reference"] else None
                if values is not None and other is not None:
                    row[f"{metric}_vs_reference"] = paired_bootstrap(values, other)
            out.append(row)
    return out


def resolve_pairs(pairs: list[str], groups: dict[str, dict[str, list[dict]]]) -> list[tuple[str, str]]:
    """``["A:B", ...]`` -> [(A, B), ...] over the pooled system labels (a label may itself hold a colon: the split
    is the one that names two known systems); an unknown label is refused with the known ones."""
    known = {label for systems in groups.values() for label in systems}
    out = []
    for pair in pairs:
        cuts = [(pair[:i], pair[i + 1 :]) for i, c in enumerate(pair) if c == ":"]
        match = [(a, b) for a, b in cuts if a in known and b in known and a != b]
        if not match:
            raise ToEError(f"--pairs {pair!r}: give two different pooled systems as A:B (known: "
                           f"{', '.join(sorted(known))})")
        out.append(match[0])
    return out


def paired_rows(groups: dict[str, dict[str, list[dict]]], pairs: list[tuple[str, str]]) -> list[dict]:
    """For each target where both systems were scored: A minus B item by item, CE and accuracy, with a 95 %
    bootstrap interval and the share of resamples where A - B > 0."""
    out = []
    for target, systems in groups.items():
        for a, b in pairs:
            if a not in systems or b not in systems:
                continue
            row = {"target": target, "a": a, "b": b, "n": len(systems[a]), "ce": None, "accuracy": None}
            for metric, key in (("ce", "ce"), ("accuracy", "correct")):
                if key in systems[a][0] and key in systems[b][0]:
                    va, vb = finite_values(systems[a], key), finite_values(systems[b], key)
                    row[metric] = paired_bootstrap(va, vb) if va is not None and vb is not None else None
            out.append(row)
    return out


def pairs_markdown(rows: list[dict]) -> str:
    lines = []
    for target in dict.fromkeys(r["target"] for r in rows):
        lines += [f"**{target}: paired differences** (A minus B on the same items, 95 % bootstrap interval)", "",
                  "| A minus B | n | CE nats [95 % CI] | accuracy [95 % CI] |", "|---|---|---|---|"]
        for r in (r for r in rows if r["target"] == target):
            ce, acc = r.get("ce"), r.get("accuracy")
            ce_s = "–" if not ce else _interval(ce["mean_diff"], ce["ci95"], lambda x: f"{x:+.4f}")
            acc_s = "–" if not acc else _interval(acc["mean_diff"], acc["ci95"], lambda x: f"{100 * x:+.1f} pts")
            lines.append(f"| {r['a']} − {r['b']} | {r['n']} | {ce_s} | {acc_s} |")
        lines.append("")
    return "\n".join(lines)


def _interval(point, ci, fmt) -> str:
    if point is None:
        return "–"
    lo, hi = ci or (None, None)
    if lo is None or hi is None:
        return f"{fmt(point)} (no interval below {MIN_INTERVAL_N} items)"
    return f"{fmt(point)} [{fmt(lo)}, {fmt(hi)}]"


def markdown(rows: list[dict]) -> str:
    lines = []
    for target in dict.fromkeys(r["target"] for r in rows):
        block = [r for r in rows if r["target"] == target]
        ref = next((r["reference"] for r in block if r["reference"]), None)
        lines += [f"**{target}**", "",
                  f"| system | n | accuracy [95 % CI] | CE nats [95 % CI] | CE gap closed [95 % CI] | "
                  f"CE minus {ref or 'reference'} [95 % CI] | accuracy minus {ref or 'reference'} |",
                  "|---|---|---|---|---|---|---|"]
        for r in block:
            acc = _interval(r["accuracy"], r["accuracy_ci95"], _pct)
            if r.get("truncated_share"):  # answers cut off by the token budget: their last number is often not one
                acc += f" ({_pct(r['truncated_share'])} out of tokens)"
            ce = _interval(r["ce"], r["ce_ci95"], _fmt)
            if r.get("ce_nonfinite"):  # NaN/inf CE on some items: no mean, no interval, said so
                ce = f"non-finite on {r['ce_nonfinite']} of {r['n']} items"
            g = r.get("ce_gap_closed")
            gap = "–" if not g else _interval(g["gap_closed"], g["ci95"], _pct)
            if g and g["format_adaptation_flag"]:
                gap += " (>100 %: format adaptation, not transfer)"
            if g and not g["defined"]:
                gap += " (teacher–base gap not significant)"
            dce, dacc = r.get("ce_vs_reference"), r.get("accuracy_vs_reference")
            dce_s = "–" if not dce else _interval(dce["mean_diff"], dce["ci95"], lambda x: f"{x:+.3f}")
            dacc_s = "–" if not dacc else _interval(dacc["mean_diff"], dacc["ci95"],
                                                      lambda x: f"{100 * x:+.1f} pts")
            lines.append(f"| {r['system']} | {r['n']} | {acc} | {ce} | {gap} | {dce_s} | {dacc_s} |")
        lines.append("")
    return "\n".join(lines)


def plot(rows: list[dict], png: str) -> None:
    """CE (and accuracy where measured) per system with 95 % intervals, one panel per target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(t, key) for t in dict.fromkeys(r["target"] for r in rows) for key in ("ce", "accuracy")
              if any(r[key] is not None for r in rows if r["target"] == t)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.8), squeeze=False)
    for ax, (target, key) in zip(axes[0], panels):
        shown = [r for r in rows if r["target"] == target and r[key] is not None]
        values = [r[key] for r in shown]
        ci = [r[f"{key}_ci95"] if None not in (r[f"{key}_ci95"] or [None]) else [v, v] for r, v in zip(shown, values)]
        err = [[max(v - c[0], 0.0) for v, c in zip(values, ci)], [max(c[1] - v, 0.0) for v, c in zip(values, ci)]]
        colors = ["#999999" if r["system"] in ANCHORS else "#4c72b0" for r in shown]
        ax.bar(range(len(values)), values, yerr=err, capsize=4, color=colors)
        ax.set_xticks(range(len(values)), [r["system"] for r in shown], rotation=30, ha="right", fontsize=8)
        ax.set_title(("CE, nats (lower is better)" if key == "ce" else "accuracy") + f"\n{target}", fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def sweep_points(rows: list[dict], knob: str) -> list[tuple[int, dict]]:
    """(value, row) for systems whose label names ``knob`` ("N" or "K") as ``N=64``, sorted by value; one target."""
    pattern = re.compile(rf"(?<![A-Za-z]){knob}=(\d+)")
    points = [(int(m.group(1)), r) for r in rows if r["system"] not in ANCHORS
              for m in [pattern.search(r["system"])] if m]
    return sorted(points, key=lambda p: p[0])


def sweep_plot(rows: list[dict], png: str) -> bool:
    """CE and accuracy vs N and vs K, read from labels such as "N=128" or "ToE-B (N=32, K=4)" (the first target's
    rows), with the base and teacher as horizontal lines. Returns False (no file) when no knob has 3 values."""
    target = rows[0]["target"] if rows else None
    block = [r for r in rows if r["target"] == target]
    knobs = {k: sweep_points(block, k) for k in ("N", "K")}
    knobs = {k: pts for k, pts in knobs.items() if len({v for v, _ in pts}) >= 3}
    metrics = [m for m in ("accuracy", "ce") if any(r[m] is not None for r in block)]
    if not knobs or not metrics:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    anchors = {r["system"]: r for r in block if r["system"] in ANCHORS}
    fig, axes = plt.subplots(len(metrics), len(knobs), figsize=(4.5 * len(knobs), 3.2 * len(metrics)), squeeze=False)
    for col, (knob, pts) in enumerate(knobs.items()):
        for row_i, metric in enumerate(metrics):
            ax = axes[row_i][col]
            xs = [v for v, r in pts if r[metric] is not None]
            ys = [r[metric] for _, r in pts if r[metric] is not None]
            ci = [r[f"{metric}_ci95"] if None not in (r[f"{metric}_ci95"] or [None]) else [r[metric]] * 2
                  for _, r in pts if r[metric] is not None]
            err = [[max(y - c[0], 0.0) for y, c in zip(ys, ci)], [max(c[1] - y, 0.0) for y, c in zip(ys, ci)]]
            ax.errorbar(xs, ys, yerr=err, fmt="o-", capsize=3)
            for name, style in (("base", ":"), ("teacher", "--")):
                if name in anchors and anchors[name][metric] is not None:
                    ax.axhline(anchors[name][metric], ls=style, color="gray", label=name)
            ax.set_xscale("log", base=2)
            ax.set(xlabel=f"{knob} ({'leaves' if knob == 'N' else 'selected leaves'})",
                   ylabel="CE, nats" if metric == "ce" else "accuracy")
            ax.legend(fontsize=7)
    fig.suptitle(target, fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return True


def leaf_usage(run_dirs: list[str], labels: dict[str, str] | None = None) -> list[dict]:
    """[{system, target, layer, usage (N,), effective_leaves}] from the eval folders whose metrics record a plug-in's
    leaf usage (`toe eval --plugin`), labelled as in :func:`pool`; ``target`` names the items it was counted on."""
    labels = labels or {}
    out = []
    for d in run_dirs:
        with open(os.path.join(d, "metrics.json")) as f:
            metrics = json.load(f)
        usage, target = metrics.get("leaf_usage", {}), _target(metrics["args"])
        run = os.path.basename(os.path.normpath(d))
        for system, layers in usage.items():
            label = labels.get(d, labels.get(run, run))
            label = label if len(usage) == 1 else f"{label}:{system}"
            out += [{"system": label, "target": target, "layer": int(layer), **u} for layer, u in layers.items()]
    return out


def usage_plot(usage: list[dict], png: str) -> None:
    """One panel per (system, layer): each leaf's share of the selection mass, leaves sorted by share, against
    the uniform share 1/N; the title gives the effective number of leaves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(4, len(usage))
    rows = -(-len(usage) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.6 * rows), squeeze=False)
    for ax, u in zip(axes.flat, usage):
        share = sorted(u["usage"], reverse=True)
        ax.bar(range(len(share)), share, width=1.0, color="#4c72b0")
        ax.axhline(1 / len(share), ls="--", color="gray", lw=1)
        ax.set_title(f"{u['system']} · layer {u['layer']} · {u['target'].split(' · ')[0]}\n"
                     f"{u['effective_leaves']:.1f} of {len(share)} leaves effective", fontsize=8)
        ax.set(xlabel="leaf (by share)", ylabel="share of selection mass")
    for ax in list(axes.flat)[len(usage):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
