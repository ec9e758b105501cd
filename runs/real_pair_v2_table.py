"""The v2 study's headline table (the README's real-pair section) from the reports runs/real_pair_v2.sh writes.

Reads RES/report-{ce,acc,code}/{report.json,pairs.json,leaf_usage.json} and writes RES/table.md and RES/table.json:
one line per study row, in the issue's priority order, with

- CE gap closed on the teacher's answers to the reported items, and graded accuracy, with 95 % intervals;
- the teacher's margin: the row minus the no-teacher control at its own layer set (CE and accuracy, paired);
- the row minus LoRA trained with the same objective (paired);
- what the row costs elsewhere: its CE on held-out code minus the bare base's (paired);
- a plug-in's mean ||Δ||/||h|| on the math items and on the code (mean over its injection layers);
- a plug-in's bank geometry before -> after training (RES/train/ROW/inspect.json: median cosine of the leaves to their
  mean, mean over layers; near 1 the bank is one vector and routing cannot matter);
- the training budget each row used (RES/train/ROW/metrics.jsonl: Stage-B steps, and the tokens sampled on-policy;
  for ToE on LoRA also the adapter's own steps, RES/train/ROW/base_adapter/metrics.jsonl);
- below the rows, each repeat with another training seed (ROW-seedK) next to ROW, paired on the same items: how far
  the training seed alone moves a row, to read the differences above against;
- and each 3-layer row minus the same system at one layer (toe3-on - toe1-on, toe3-off - toe1-off, ctl3 - ctl1).

Rows not scored yet are listed as missing, so a partial table says what it lacks.

With --sweep, RES is the sweep's (runs/real_pair_v2_sweep.sh: results/real_pair_v2/sweep) and the table has one
line per sweep point instead: what it changes against its reference point (read from the two runs' kept arguments
and plug-in configs — layer set, N, the bank's signal —, so the column cannot drift from what was trained), its CE gap
closed on the tuning rows' teacher answers, the paired difference from the reference (RES/report-ce/pairs.json),
its divergence on its own samples over the second half of its steps, and its bank geometry.

Usage: python runs/real_pair_v2_table.py [RES] [--readme README.md] [--sweep] [--sweep-pairs]
  (default RES: results/real_pair_v2)
  --sweep-pairs: print the sweep report's comparisons, each scored point minus its reference (the sweep script's
  pooled report reads them from here, so the reference rule has one home)
  --readme: also put the table into that file, between its lines `<!-- v2-table -->` and `<!-- /v2-table -->`
  (the README's real-pair section shows the committed table, never a copy typed by hand).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from tree_of_experts.io import atomic_write_json, atomic_write_text

ROWS = ["ctl3", "toe3-on", "lora8-on", "toe3-off", "lora8-off", "toe3+lora", "oracle3", "toe1-on", "ctl1", "toe1-off",
        "lora1-on", "lora1-off"]
CONTROL = {"toe3-on": "ctl3", "toe3-off": "ctl3", "toe1-on": "ctl1", "toe1-off": "ctl1"}
LORA = {"toe3-on": "lora8-on", "toe3-off": "lora8-off", "toe1-on": "lora1-on", "toe1-off": "lora1-off",
        "toe3+lora": "lora8-on"}
# three injection layers against one, the same system and objective (runs/real_pair_v2.sh pairs them)
LAYER_SETS = [("toe3-on", "toe1-on"), ("toe3-off", "toe1-off"), ("ctl3", "ctl1")]


def read(path: str):
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def interval(point, ci, fmt) -> str:
    if point is None:
        return "–"
    lo, hi = ci or (None, None)
    return fmt(point) if lo is None or hi is None else f"{fmt(point)} [{fmt(lo)}, {fmt(hi)}]"


def pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def pts(x: float) -> str:
    return f"{100 * x:+.1f} pts"


def nats(x: float) -> str:
    return f"{x:+.4f}"


def gap_cell(ce: dict | None) -> str:
    """CE gap closed with its interval, from a report row (or an oracle system's)."""
    g = ce.get("ce_gap_closed") if ce else None
    return interval(g["gap_closed"], g["ci95"], pct) if g else "–"


def acc_cell(acc: dict | None) -> str:
    return interval(acc["accuracy"], acc["accuracy_ci95"], pct) if acc else "–"


def paired(pairs: list, a: str, b: str, metric: str) -> str:
    row = next((p for p in pairs if p["a"] == a and p["b"] == b), None)
    d = row and row.get(metric)
    if not d:
        return "–"
    return interval(d["mean_diff"], d["ci95"], nats if metric == "ce" else pts)


def delta_ratio(usage: list, system: str) -> float | None:
    values = [u["delta_ratio"] for u in usage if u["system"] == system and "delta_ratio" in u]
    return sum(values) / len(values) if values else None


def bank_geometry(res: str, row: str) -> tuple[float, float] | None:
    """(before, after) median leaf cosine to the bank's mean, averaged over the injection layers."""
    info = read(os.path.join(res, "train", row, "inspect.json"))
    banks = [b for b in (info or {}).get("banks", {}).values() if "bank_before_training" in b]
    pairs = [(b["bank_before_training"]["cos_to_common_median"], b["bank"]["cos_to_common_median"]) for b in banks]
    pairs = [p for p in pairs if None not in p]
    if not pairs:
        return None
    return sum(p[0] for p in pairs) / len(pairs), sum(p[1] for p in pairs) / len(pairs)


def logged(path: str) -> list[dict] | None:
    """The rows of a training's metrics.jsonl (None where there is none)."""
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def geometry_cell(geo: tuple[float, float] | None) -> str:
    return "–" if geo is None else f"{geo[0]:.2f} → {geo[1]:.2f}"


def budget(res: str, row: str) -> dict | None:
    """Stage-B steps trained, how many were on-policy and the tokens sampled in them (from the logged rows)."""
    rows = logged(os.path.join(res, "train", row, "metrics.jsonl"))
    if rows is None:
        return None
    a = max((r["step"] for r in rows if r.get("stage") == "A"), default=0)
    b = [r for r in rows if r.get("stage") != "A"]
    if not b:
        return None
    on = [r for r in b if r.get("objective") == "on_policy"]
    spent = {"steps": max(r["step"] for r in b) - a, "logged": len(b), "on_policy": len(on),
             "sampled_tokens": sum(r.get("sample_tokens") or 0 for r in on)}
    adapter = logged(os.path.join(res, "train", row, "base_adapter", "metrics.jsonl"))  # ToE on LoRA: its own steps
    if adapter is not None:
        spent["adapter_steps"] = max((r["step"] for r in adapter), default=0)
    return spent


def budget_cell(d: dict | None) -> str:
    if not d:
        return "–"
    text = f"{d['steps']} steps"
    if d["on_policy"]:
        text += f", {d['on_policy']} on-policy, {d['sampled_tokens'] / 1000:.1f}k sampled tokens"
        if d["logged"] < d["steps"]:
            text += " (logged steps)"
    if d.get("adapter_steps"):
        text += f", on top of its LoRA adapter's {d['adapter_steps']} steps"
    return text


def seed_repeats(by: dict) -> list[dict]:
    """Rows named ROW-seedK (runs/real_pair_v2.sh with SEED and that NAME_SUFFIX), each with the ROW it repeats."""
    names = sorted({k for t in ("ce", "acc") for k in by[t] if "-seed" in k})
    return [{"row": name, "repeats": name.rsplit("-seed", 1)[0]} for name in names]


def main(res: str, readme: str | None = None) -> dict:
    reports = {t: read(os.path.join(res, f"report-{t}", "report.json")) or [] for t in ("ce", "acc", "code")}
    pairs = {t: read(os.path.join(res, f"report-{t}", "pairs.json")) or [] for t in ("ce", "acc", "code")}
    usage = {t: read(os.path.join(res, f"report-{t}", "leaf_usage.json")) or [] for t in ("ce", "code")}
    by = {t: {r["system"]: r for r in rows} for t, rows in reports.items()}
    lines = ["| row | CE gap closed | accuracy | minus control: CE / accuracy | minus LoRA, same objective: CE / "
             "accuracy | code CE minus bare base | ‖Δ‖/‖h‖ math / code | bank: leaf cos to mean, before → after | "
             "budget |", "|---|---|---|---|---|---|---|---|---|"]
    anchors = []
    for name in ("base", "teacher"):
        ce, acc = by["ce"].get(name), by["acc"].get(name)
        if ce or acc:
            anchors.append(f"| {name} | – | {acc_cell(acc)} | – | – | – | – | – | – |")
    table, missing = [], []
    for row in ROWS:
        ce, acc = by["ce"].get(row), by["acc"].get(row)
        oracle = {k: v for k, v in by["ce"].items() if k.startswith(f"{row}:")}
        if not (ce or acc or oracle):
            missing.append(row)
            continue
        if oracle:  # the oracle folder: one line per O1/O2 system, CE only
            for label, r in oracle.items():
                lines.append(f"| {label} | {gap_cell(r)} | – | – | – | – | – | – | – |")
                table.append({"row": label, "ce_gap_closed": r.get("ce_gap_closed")})
            continue
        g = ce.get("ce_gap_closed") if ce else None
        ctl, lora = CONTROL.get(row), LORA.get(row)
        margin = f"{paired(pairs['ce'], row, ctl, 'ce')} / {paired(pairs['acc'], row, ctl, 'accuracy')}" if ctl else "–"
        vs_lora = f"{paired(pairs['ce'], row, lora, 'ce')} / {paired(pairs['acc'], row, lora, 'accuracy')}" \
            if lora else "–"
        math_dr, code_dr = delta_ratio(usage["ce"], row), delta_ratio(usage["code"], row)
        dr = "–" if math_dr is None else f"{math_dr:.4f} / {'–' if code_dr is None else f'{code_dr:.4f}'}"
        geo, spent = bank_geometry(res, row), budget(res, row)
        lines.append(f"| {row} | {gap_cell(ce)} | {acc_cell(acc)} | {margin} | {vs_lora} | "
                     f"{paired(pairs['code'], row, 'base', 'ce')} | {dr} | {geometry_cell(geo)} | "
                     f"{budget_cell(spent)} |")
        table.append({"row": row, "ce_gap_closed": g, "accuracy": acc and acc["accuracy"],
                      "accuracy_ci95": acc and acc["accuracy_ci95"], "control": ctl, "lora": lora,
                      "delta_ratio_math": math_dr, "delta_ratio_code": code_dr, "leaf_cos_to_mean": geo,
                      "budget": spent})
    n = {t: next((r["n"] for r in rows), None) for t, rows in reports.items()}
    items = [what for what, k in ((f"CE on the teacher's answers to {n['ce']} GSM8K dev rows", "ce"),
                                  (f"accuracy on {n['acc']} of them", "acc"), (f"held-out code: {n['code']} chunks", "code"))
             if n[k] is not None]
    text = ("\n".join(lines[:2] + anchors + lines[2:]) + "\n\n"
            f"Items: {'; '.join(items) or 'none scored yet'}; differences are paired on items (95 % bootstrap "
            "intervals).\n")
    if missing:
        text += f"\nNot scored yet: {', '.join(missing)}.\n"
    repeats = seed_repeats(by)
    if repeats:
        text += ("\nThe same row trained with another seed (same data, budget and items; the repeat minus the row, "
                 "paired on items):\n\n| repeat | CE gap closed | accuracy | minus the seed-0 row: CE / accuracy |\n"
                 "|---|---|---|---|\n")
    for r in repeats:
        ce, acc = by["ce"].get(r["row"]), by["acc"].get(r["row"])
        margin = f"{paired(pairs['ce'], r['row'], r['repeats'], 'ce')} / " \
                 f"{paired(pairs['acc'], r['row'], r['repeats'], 'accuracy')}"
        text += f"| {r['row']} | {gap_cell(ce)} | {acc_cell(acc)} | {margin} |\n"
        r.update(ce_gap_closed=ce and ce.get("ce_gap_closed"), accuracy=acc and acc["accuracy"])
    layer_sets = [{"row": a, "minus": b} for a, b in LAYER_SETS if by["ce"].get(a) and by["ce"].get(b)]
    if layer_sets:
        layers = [(read(os.path.join(res, ex, "summary.json")) or {}).get("layers")
                  for ex in ("extract-l3", "extract-l1")]  # the layer sets the rows were trained at
        which = " vs ".join(", ".join(map(str, x)) if x else "?" for x in layers)
        text += (f"\nThree injection layers against one ({which}; the same system and objective, paired on "
                 "items):\n\n| rows | CE on the teacher's answers | accuracy | code CE |\n|---|---|---|---|\n")
    for r in layer_sets:
        a, b = r["row"], r["minus"]
        text += (f"| {a} minus {b} | {paired(pairs['ce'], a, b, 'ce')} | {paired(pairs['acc'], a, b, 'accuracy')} | "
                 f"{paired(pairs['code'], a, b, 'ce')} |\n")
    out = {"rows": table, "missing": missing, "items": n, "seed_repeats": repeats, "layer_sets": layer_sets}
    atomic_write_text(os.path.join(res, "table.md"), text)
    atomic_write_json(os.path.join(res, "table.json"), out)
    if readme:
        into_readme(readme, text)
    print(text)
    return out


# the sweep's reference points: every ToE point changes one knob of the first, every LoRA point of the second
SWEEP_REFERENCES = ("toe3-on-default", "lora8-on-lora")
# arguments that name where a run lived, not what it trained (what an extraction differs in is read from the plug-in)
WHERE = {"out", "resume", "overwrite", "save_every", "base", "teacher", "data", "experts"}


def sweep_reference(point: str) -> str:
    return SWEEP_REFERENCES[1] if point.startswith("lora") else SWEEP_REFERENCES[0]


def sweep_pairs(res: str) -> list[str]:
    """The sweep report's comparisons: each point scored on CE (RES/ce/POINT) minus its reference, once scored."""
    ce = os.path.join(res, "ce")
    scored = sorted(p for p in (os.listdir(ce) if os.path.isdir(ce) else [])
                    if os.path.isfile(os.path.join(ce, p, "metrics.json")))
    refs = {p: sweep_reference(p) for p in scored}
    return [f"{p}:{ref}" for p, ref in refs.items() if p not in ("anchors", ref) and ref in scored]


def run_args(res: str, point: str) -> dict | None:
    """The run's arguments, and for a plug-in what its extraction gave it: the layer set, N and the bank's signal."""
    folder = os.path.join(res, "train", point)
    args = read(os.path.join(folder, "train_args.json")) or read(os.path.join(folder, "baseline_args.json"))
    config = read(os.path.join(folder, "toe_config.json"))
    if args is not None and config is not None:
        signals = sorted({b.get("signal") for b in (config.get("bank_info") or {}).values()})
        args = {**args, "layers": config.get("layers"), "N": config.get("num_leaves"),
                "bank signal": "; ".join(map(str, signals))}
    return args


def changed(res: str, point: str, ref: str) -> str:
    """The arguments POINT trained with that REF did not (both from their kept argument files)."""
    if point == ref:
        return "the reference"
    a, b = run_args(res, point), run_args(res, ref)
    if a is None or b is None:
        return "?"
    keys = sorted(k for k in set(a) | set(b) if k not in WHERE and a.get(k) != b.get(k))
    return ", ".join(f"{k} {a.get(k)} (not {b.get(k)})" for k in keys) or "nothing"


def late_divergence(res: str, point: str) -> float | None:
    """Mean generalized JSD (at the point's β) on its own samples over the second half of its on-policy steps."""
    rows = logged(os.path.join(res, "train", point, "metrics.jsonl")) or []
    on = [r for r in rows if r.get("objective") == "on_policy" and r.get("jsd") is not None]
    late = on[len(on) // 2:]
    return sum(r["jsd"] for r in late) / len(late) if late else None


def sweep(res: str) -> dict:
    """One line per sweep point scored on CE (see the module's docstring)."""
    report = read(os.path.join(res, "report-ce", "report.json")) or []
    pairs = read(os.path.join(res, "report-ce", "pairs.json")) or []
    points = [r for r in report if r["system"] not in ("base", "teacher")]
    points.sort(key=lambda r: (sweep_reference(r["system"]), r["system"] not in SWEEP_REFERENCES, r["system"]))
    lines = ["| point | changes against its reference | CE gap closed | minus the reference: CE | divergence "
             "(at the point's β) on own samples, late steps | bank: leaf cos to mean, before → after | budget |",
             "|---|---|---|---|---|---|---|"]
    table = []
    for r in points:
        name, ref = r["system"], sweep_reference(r["system"])
        jsd, geo, spent = late_divergence(res, name), bank_geometry(res, name), budget(res, name)
        lines.append(f"| {name} | {changed(res, name, ref)} | {gap_cell(r)} | "
                     f"{'–' if name == ref else paired(pairs, name, ref, 'ce')} | "
                     f"{'–' if jsd is None else f'{jsd:.4f}'} | "
                     f"{geometry_cell(geo)} | {budget_cell(spent)} |")
        table.append({"point": name, "reference": ref, "ce_gap_closed": r.get("ce_gap_closed"),
                      "late_jsd": jsd, "leaf_cos_to_mean": geo, "budget": spent})
    n = next((r["n"] for r in report), None)
    text = "\n".join(lines) + (f"\n\nItems: CE on the teacher's answers to {n} GSM8K dev rows (the tuning rows, never "
                               "reported in the study); differences are paired on items (95 % bootstrap intervals). "
                               "The divergence column is each point's training loss on its own samples — the "
                               "generalized JSD at its β (β 1: reverse KL, β 0: forward KL) —, comparable only "
                               "between points with the same β.\n"
                               if n else "\n\nNo point scored yet.\n")
    out = {"points": table, "items": n}
    atomic_write_text(os.path.join(res, "table.md"), text)
    atomic_write_json(os.path.join(res, "table.json"), out)
    print(text)
    return out


def into_readme(path: str, text: str) -> None:
    """Replace what stands between the README's `<!-- v2-table -->` and `<!-- /v2-table -->` lines with TEXT."""
    with open(path) as f:
        doc = f.read()
    start, end = "<!-- v2-table -->\n", "<!-- /v2-table -->"
    if start not in doc or end not in doc:
        sys.exit(f"{path} has no `<!-- v2-table -->` ... `<!-- /v2-table -->` lines: add them where the table goes")
    head, rest = doc.split(start, 1)
    atomic_write_text(path, head + start + text + "\n" + end + rest.split(end, 1)[1])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="The v2 study's headline table from its reports.")
    parser.add_argument("res", nargs="?", default=os.path.join(os.path.dirname(__file__), "..", "results",
                                                               "real_pair_v2"))
    parser.add_argument("--readme", help="also write the table between this file's v2-table marker lines")
    parser.add_argument("--sweep", action="store_true", help="RES is the sweep's: one line per sweep point")
    parser.add_argument("--sweep-pairs", action="store_true",
                        help="print the sweep report's comparisons (POINT:REFERENCE, one per line) and stop")
    args = parser.parse_args()
    if args.sweep_pairs:
        print("\n".join(sweep_pairs(args.res)))
        sys.exit(0)
    if args.sweep and args.readme:
        parser.error("--readme takes the study's table, not the sweep's: drop one of them")
    if args.sweep:
        sweep(args.res)
    else:
        main(args.res, args.readme)
