"""A study's rendering: its markdown table with the verdict, the page section it regenerates, and its plots, from
the numbers of :mod:`tree_of_experts.evaluation.study_stats` and the training folders."""

from __future__ import annotations

import json
import logging
import os
import re

from ..files import atomic_write_json, atomic_write_text
from ..folders import run_summary
from .study_stats import target_table, verdict_word

log = logging.getLogger(__name__)


# -- what the training folders say ---------------------------------------------------------------------------------
def training_facts(study, row) -> dict:
    """Seed 0's budget (Stage-B steps, on-policy steps, sampled tokens) and a plug-in's bank geometry before ->
    after training (median leaf cosine to the bank's mean, averaged over layers: near 1, one vector)."""
    folder = os.path.join(study.out, "train", row.labels()[0])
    facts: dict = {}
    metrics = os.path.join(folder, "metrics.jsonl")
    if os.path.isfile(metrics):
        rows = [json.loads(x) for x in open(metrics)]
        stage_b = [r for r in rows if r.get("stage") in ("B", "C", None)]
        # Stage-B steps: the last logged step past the warm-up's (rows are every log_every steps; the last is logged)
        logged = [r["step"] for r in rows if isinstance(r.get("step"), int)]
        facts["steps"] = max(logged, default=0) - max((r["step"] for r in rows if r.get("stage") == "A"), default=0)
        last = stage_b[-1] if stage_b else {}
        if "on_policy_steps" in last:  # totals logged with every row: right whatever log_every is
            facts["on_policy_steps"], facts["sampled_tokens"] = last["on_policy_steps"], last["sample_tokens_total"]
        else:  # a run from before the totals, which logged every step (v2's on-policy rows did)
            facts["on_policy_steps"] = sum(r.get("objective") == "on_policy" for r in stage_b)
            facts["sampled_tokens"] = sum(r.get("sample_tokens", 0) or 0 for r in stage_b)
    path = run_summary(folder)
    if path:
        summary = json.load(open(path))
        summary = summary.get("train", summary)
        if "steps" in summary:
            facts["steps"] = summary["steps"] - (summary.get("stage_a_steps") or 0)
    info = os.path.join(folder, "inspect.json")
    if os.path.isfile(info):
        banks = json.load(open(info)).get("banks", {}).values()
        pairs = [(b["bank_before_training"]["cos_to_common_median"], b["bank"]["cos_to_common_median"])
                 for b in banks if "bank_before_training" in b]
        if pairs:
            facts["leaf_cos_to_mean"] = [sum(p[0] for p in pairs) / len(pairs), sum(p[1] for p in pairs) / len(pairs)]
    return facts


# -- rendering -----------------------------------------------------------------------------------------------------
def fmt_interval(entry: dict | None, f) -> str:
    """A point and its 95 % interval, each formatted by ``f`` ("–" for none)."""
    if not entry or entry.get("point") is None:
        return "–"
    lo, hi = entry["ci95"]
    return f(entry["point"]) if lo is None else f"{f(entry['point'])} [{f(lo)}, {f(hi)}]"


def pct(v: float) -> str:
    return f"{100 * v:.1f} %"


def nats(v: float) -> str:
    return f"{v:+.4f}"


def pts(v: float) -> str:
    return f"{100 * v:+.1f} pts"


def markdown(study, tables: dict[str, dict], verdict: str) -> str:
    ce, acc = tables.get("ce"), tables.get("acc")
    sets = [t for t in tables if t in study.cfg.scoring.answer_sets]  # CE on the teacher's answers to other items
    extra = [t for t in tables if t not in ("ce", "acc", *sets)]
    names = ["base", "teacher"] + [r for t in tables.values() for r in t["rows"] if r not in ("base", "teacher")]
    names = list(dict.fromkeys(names))
    planned = {r.name: r.seeds for r in study.cfg.rows}
    head = ["row", "seeds"] + (["CE gap closed", "per seed"] if ce else []) + (["accuracy"] if acc else []) + \
        [f"{t} CE gap closed" for t in sets] + [f"{t} CE minus base" for t in extra] + \
        ["budget (seed 0)", "bank: leaf cos to mean, before → after"]
    by_row = {r.name: r for r in study.cfg.rows}
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in names:
        seeds = max((t["rows"][name]["seeds"] for t in tables.values() if name in t["rows"]), default=0)
        plan = planned.get(name.split(":")[0], 1)
        cells = [name, f"{seeds}" + (f" of {plan}" if seeds < plan else "")]
        if ce:
            r = ce["rows"].get(name, {})
            cells.append(fmt_interval(r.get("gap_closed"), pct))
            cells.append(", ".join(pct(v) for v in r.get("gap_closed", {}).get("per_seed", [])) or "–")
        if acc:
            cells.append(fmt_interval(acc["rows"].get(name, {}).get("mean"), pct))
        cells += [fmt_interval(tables[t]["rows"].get(name, {}).get("gap_closed"), pct) for t in sets]
        cells += [fmt_interval(tables[t]["rows"].get(name, {}).get("minus_base"), nats) for t in extra]
        facts = training_facts(study, by_row[name]) if name in by_row else {}
        budget = f"{facts['steps']} steps" if facts.get("steps") else "–"
        if facts.get("on_policy_steps"):
            budget += f", {facts['on_policy_steps']} on-policy, {facts['sampled_tokens'] / 1000:.1f}k sampled tokens"
        geo = facts.get("leaf_cos_to_mean")
        cells += [budget, f"{geo[0]:.2f} → {geo[1]:.2f}" if geo else "–"]
        lines.append("| " + " | ".join(cells) + " |")
    comp = [c for t in tables.values() for c in t["comparisons"]]
    if comp:
        lines += ["", "| comparison | target | difference [95 % interval] | margin · level from | seeds × items | "
                  "reading |", "|---|---|---|---|---|---|"]
        for t, table in tables.items():
            f = pts if t == "acc" else nats
            for c in table["comparisons"]:
                margin = ("–" if c.get("margin") is None else f"±{f(c['margin'])[1:]}") + \
                    (f" · ±{f(c['level_from'])[1:]}" if c.get("level_from") is not None else "")
                lines.append(f"| {c['a']} − {c['b']} | {t} | {fmt_interval(c, f)} | {margin} | "
                             f"{c['seeds'][0]}/{c['seeds'][1]} × {c['items']} | {c['reading']} |")
    for row in study.cfg.rows:  # the predictability ceiling: how much of δ the base's own state predicts
        info = os.path.join(study.out, "ce", row.labels()[0], "oracle.json")
        fit = json.load(open(info)).get("predictability") if row.kind == "oracle" and os.path.isfile(info) else None
        if fit:
            lines += ["", f"`{row.name}`: held-out R² of the teacher's signal δ from the base's own state h (after the "
                          "mean), and the mean's share of δ's energy:", "",
                      "| layer | R², ridge | R², MLP | mean's share | tokens (train / held out) |", "|---|---|---|---|---|"]
            lines += [f"| {layer} | {e['r2_ridge']:.3f} | {e.get('r2_mlp', float('nan')):.3f} | {e['mean_share']:.3f} "
                      f"| {e['train_tokens']} / {e['heldout_tokens']} |" for layer, e in fit.items()]
    n = {t: v["items"] for t, v in tables.items()}
    lines += ["", "Items: " + ", ".join(f"{t} {k}" for t, k in n.items()) + ". Intervals: 95 %, two-level bootstrap "
              "(seeds, then items; rows on the same seeds paired on them, all rows on items; a one-seed row's interval "
              "is over items only). CE in nats, lower is better (a difference below zero: the first row better)"
              + ("; accuracy in points, higher is better (above zero: the first row better)" if "acc" in tables
                 else "") + ". An interval that includes zero reads level only "
              f"within the margin (scoring.margin: {pct(study.cfg.scoring.margin)} of the base–teacher gap, unless "
              "scoring.margins sets it), and not resolved beyond it; \"level from\" is the smallest margin under "
              "which it would read level.", "", verdict]
    return "\n".join(lines) + "\n"


def verdict_text(study, tables: dict[str, dict]) -> str:
    """The verdict paragraph: the range of gap closed, then per target the comparisons grouped by the fixed rule's
    reading (better / level / worse), each with its difference and interval."""
    parts = []
    ce = tables.get("ce")
    if ce:
        trained = {r: v["gap_closed"] for r, v in ce["rows"].items() if "gap_closed" in v and ":" not in r}
        if trained:
            lo, hi = min(trained, key=lambda r: trained[r]["point"]), max(trained, key=lambda r: trained[r]["point"])
            seeds = sorted({ce["rows"][r]["seeds"] for r in trained})
            span = (f"The trained row {lo} closes {pct(trained[lo]['point'])}" if lo == hi else
                    f"Trained rows close between {pct(trained[lo]['point'])} ({lo}) and "
                    f"{pct(trained[hi]['point'])} ({hi})")
            parts.append(f"{span} of the CE gap between the base and the teacher "
                         f"({'/'.join(map(str, seeds))} seed(s) per row, {ce['items']} items).")
    names = {"ce": "CE on the teacher's answers", "acc": "accuracy",
             **{t: f"CE on the teacher's {t} answers" for t in study.cfg.scoring.answer_sets}}
    for t, table in tables.items():
        f = pts if t == "acc" else nats
        groups: dict[str, list[str]] = {}
        for c in table["comparisons"]:
            groups.setdefault(verdict_word(c, t), []).append(f"{c['a']} − {c['b']} {fmt_interval(c, f)}")
        if groups:
            said = {"better": "the first row is better (interval excludes zero)",
                    "worse": "the first row is worse (interval excludes zero)",
                    "level": "level (interval includes zero, within the margin)",
                    "unresolved": "not resolved (interval includes zero but reaches beyond the margin)",
                    "no_margin": "interval includes zero (no margin for this target)",
                    "undefined": "no interval (too few items)"}
            order = ("better", "level", "unresolved", "no_margin", "worse", "undefined")
            parts.append(f"{names.get(t, f'{t} CE')}: "
                         + "; ".join(f"{said[w]}: {', '.join(groups[w])}" for w in order if w in groups) + ".")
    scored = {r.split(":")[0] for t in tables.values() for r in t["rows"]}
    missing = [r.name for r in study.cfg.rows if r.name not in scored]
    if missing:
        parts.append(f"Not scored yet: {', '.join(missing)}.")
    made = {f"{c['a']} - {c['b']}" for t in tables.values() for c in t["comparisons"]}
    open_ = [c for c in study.cfg.compare if " - ".join(x.strip() for x in c.split(" - ")) not in made]
    if open_:  # a side not scored yet, or an oracle system the oracle did not produce
        parts.append(f"Not compared yet: {'; '.join(' − '.join(x.strip() for x in c.split(' - ')) for c in open_)}.")
    return "**Verdict (computed from the intervals):** " + " ".join(parts) if parts else ""


def render(study) -> dict:
    """Writes OUT/table.md, OUT/table.json, OUT/study.png and OUT/curves.png (and the README section when the config
    names one) from what is scored so far; returns a short summary."""
    targets = [t for t in study.target_dirs() if os.path.isdir(os.path.join(study.out, t))]
    tables = {t: target_table(study, t) for t in targets}
    tables = {t: v for t, v in tables.items() if v["rows"]}
    verdict = verdict_text(study, tables)
    body = markdown(study, tables, verdict)
    md = f"## Study `{study.cfg.name}`\n\n" + body
    rows = {}
    for t, table in tables.items():
        for name, entry in table["rows"].items():
            rows.setdefault(name, {"name": name})[t] = entry
    curves = dev_curves(study)
    atomic_write_json(os.path.join(study.out, "table.json"), {
        "name": study.cfg.name, "rows": list(rows.values()), "curves": curves,
        "comparisons": [c | {"target": t} for t, v in tables.items() for c in v["comparisons"]],
        "verdict": verdict})
    atomic_write_text(os.path.join(study.out, "table.md"), md)
    if "ce" in tables:
        plot_gap(tables["ce"], os.path.join(study.out, "study.png"), study.cfg.name)
    plot_curves(study, os.path.join(study.out, "curves.png"))
    if curves:
        plot_dev_curves(study, curves, os.path.join(study.out, "curves-dev.png"))
    if study.cfg.readme:
        page, here = os.path.abspath(study.cfg.readme), os.path.abspath(study.out)
        root = checkout_of(page)
        if os.path.commonpath([root, here]) == root:  # the study folder lives in the page's checkout
            put_in_readme(study.cfg.readme, study.cfg.name, body)
        else:  # a copy elsewhere renders its own files and leaves the page alone
            log.info("the study folder %s is outside %s: %s is left as it is", here, root, page)
    return {"summary": f"study {study.cfg.name}: table in {os.path.join(study.out, 'table.md')}", "verdict": verdict}


def checkout_of(path: str) -> str:
    """The folder holding ``.git`` above ``path`` (its folder when there is none)."""
    d = os.path.dirname(path)
    while True:
        if os.path.exists(os.path.join(d, ".git")):
            return d
        if os.path.dirname(d) == d:
            return os.path.dirname(path)
        d = os.path.dirname(d)


def put_in_readme(path: str, name: str, md: str, kind: str = "study") -> None:
    """Replaces the text between ``<!-- KIND:NAME -->`` and ``<!-- /KIND:NAME -->`` in ``path``."""
    start, end = f"<!-- {kind}:{name} -->", f"<!-- /{kind}:{name} -->"
    text = open(path).read() if os.path.isfile(path) else ""
    if start not in text or end not in text:
        log.warning("%s has no %s ... %s section: the table was not put there", path, start, end)
        return
    new = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: f"{start}\n{md}{end}", text, flags=re.S)
    if new != text:
        atomic_write_text(path, new)


def plot_gap(table: dict, png: str, name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(r, v["gap_closed"]) for r, v in table["rows"].items() if "gap_closed" in v]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(6, 0.4 * len(rows) + 1.2))
    for i, (r, g) in enumerate(rows):
        lo, hi = g["ci95"]
        if lo is not None:
            ax.plot([100 * lo, 100 * hi], [i, i], color="C0")
        ax.plot([100 * g["point"]], [i], "o", color="C0")
        for s in g.get("per_seed", []):
            ax.plot([100 * s], [i], "x", color="C1", ms=4)
    ax.set_yticks(range(len(rows)), [r for r, _ in rows])
    ax.axvline(0, color="grey", lw=0.5)
    ax.set(xlabel="CE gap closed, % (o: mean, x: seeds, line: 95 % interval)", title=f"study {name}")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def plot_curves(study, png: str) -> None:
    """Training curves (Stage-B loss per step) of every trained row and seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = []
    for i, row in enumerate(study.cfg.rows):
        for label in row.labels():
            path = os.path.join(study.out, "train", label, "metrics.jsonl")
            if os.path.isfile(path):
                pts_ = [json.loads(x) for x in open(path)]
                pts_ = [(p["step"], p["loss"]) for p in pts_ if p.get("stage", "B") != "A" and "loss" in p]
                if pts_:
                    curves.append((row.name, label, i, pts_))
    if not curves:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    seen = set()
    for name, label, i, p in curves:
        ax.plot(*zip(*p), color=f"C{i % 10}", lw=1, label=name if name not in seen else None)
        seen.add(name)
    ax.set(xlabel="step", ylabel="training loss", title=f"study {study.cfg.name}: training curves")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def dev_curves(study) -> dict[str, list[dict]]:
    """{run label: [{step, ce, ce_ci95}]}: each trained run's CE on the tuning rows' teacher answers along training
    (OUT/curve/LABEL/curve.json, scoring.curve_every)."""
    out = {}
    for row in study.cfg.rows:
        for label in row.labels():
            path = os.path.join(study.out, "curve", label, "curve.json")
            if os.path.isfile(path):
                out[label] = json.load(open(path))["points"]
    return out


def plot_dev_curves(study, curves: dict[str, list[dict]], png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    seen = set()
    for i, row in enumerate(study.cfg.rows):
        for label in row.labels():
            if label in curves:
                pts_ = curves[label]
                ax.plot([p["step"] for p in pts_], [p["ce"] for p in pts_], "o-", ms=3, color=f"C{i % 10}", lw=1,
                        label=row.name if row.name not in seen else None)
                seen.add(row.name)
    ax.set(xlabel="training step", ylabel="CE on the tuning rows' teacher answers (nats)",
           title=f"study {study.cfg.name}: learning curves")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
