"""The real-pair studies' headline, rendered from their tables (never typed by hand): the teacher's margin over the
no-teacher control and ToE minus LoRA at both budgets (v2: 40 steps of 4 sequences, 3 seeds; v3: 4 passes over the
traces), what the state loss adds, and the predictability ceiling of any static bank.

    python runs/real_pair_headline.py            # writes results/real_pair_headline.md and README's section

Reads results/real_pair_v2/table.json and results/real_pair_v3/table.json (`toe study` writes them after every
scoring); a comparison a study has not scored yet reads "not run yet". README.md holds the output between
``<!-- headline:real_pair -->`` and ``<!-- /headline:real_pair -->``.
"""

from __future__ import annotations

import json
import os

from tree_of_experts.evaluation.study_stats import coverage, verdict_word
from tree_of_experts.evaluation.study_table import fmt_interval, nats, pct, put_in_readme
from tree_of_experts.files import atomic_write_text

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
STUDIES = {"v2": "results/real_pair_v2/table.json", "v3": "results/real_pair_v3/table.json"}
QUESTIONS = [  # (what it asks, comparison A - B) in CE on the teacher's GSM8K answers
    ("the teacher's margin: ToE minus its no-teacher control", "toe3-off", "ctl3"),
    ("ToE minus LoRA r8 (same text, objective, budget)", "toe3-off", "lora8-off"),
    ("what the state loss adds to ToE", "toe3-off-state", "toe3-off"),
    ("what the state loss adds to LoRA", "lora8-off-state", "lora8-off"),
]
GAP_ROWS = ["toe3-off", "ctl3", "lora8-off", "toe3-off-state", "lora8-off-state"]
CONFIGS = {"v2": "studies/real_pair_v2.yaml", "v3": "studies/real_pair_v3.yaml"}
NOT_RUN, NOT_IN = "not run yet", "–"
CEILING = [("the live teacher's δ (O1, trained map)", "ceiling3:O1-map"),
           ("δ̂(h) predicted from the base's state, MLP", "ceiling3:predicted-mlp"),
           ("δ̂(h) predicted, ridge", "ceiling3:predicted-ridge"),
           ("the mean δ added everywhere (static)", "ceiling3:static-mean")]


def load(path: str) -> dict:
    full = os.path.join(ROOT, path)
    if not os.path.isfile(full):
        raise SystemExit(f"{path} not found: run (or render) that study first")
    return json.load(open(full))


def planned(config: str) -> set[str]:
    """The rows a study's config names (a row it does not name reads "not in this study", not "not run yet")."""
    import yaml

    return {r["name"] for r in yaml.safe_load(open(os.path.join(ROOT, config)))["rows"]}


def comparison(table: dict, a: str, b: str) -> str:
    for c in table["comparisons"]:
        if c["a"] == a and c["b"] == b and c["target"] == "ce":
            word = {"better": "A better", "worse": "A worse", "level": "level", "unresolved": "not resolved",
                    "no_margin": "includes zero"}.get(verdict_word(c, "ce"), "no interval")
            seeds = f"A {c['seeds'][0]}, B {c['seeds'][1]} seed(s)" + coverage(c["seeds"])
            within = f"; level from ±{c['level_from']:.4f}" if c.get("level_from") is not None else ""
            return f"{fmt_interval(c, nats)}: **{word}** ({seeds}{within})"
    return NOT_RUN


def margin(table: dict) -> str:
    """The equivalence margin of the study's CE comparisons, and its share of the base-teacher gap."""
    m = next((c["margin"] for c in table["comparisons"] if c["target"] == "ce" and c.get("margin") is not None), None)
    ce = {r["name"]: r["ce"]["mean"]["point"] for r in table["rows"] if r["name"] in ("base", "teacher")}
    if m is None or len(ce) < 2:
        return "none (no CE comparison with a margin)"
    return f"±{m:.4f} nats, {100 * m / abs(ce['teacher'] - ce['base']):.0f} % of the base–teacher gap"


def gap(table: dict, row: str) -> str:
    for r in table["rows"]:
        if r["name"] == row and "gap_closed" in r.get("ce", {}):
            return f"{fmt_interval(r['ce']['gap_closed'], pct)} ({r['ce']['seeds']} seed(s))"
    return NOT_RUN


def render() -> str:
    tables = {k: load(p) for k, p in STUDIES.items()}
    rows = {k: planned(p) for k, p in CONFIGS.items()}

    def cmp(v: str, a: str, b: str) -> str:
        return comparison(tables[v], a, b) if {a, b} <= rows[v] | {"base", "teacher"} else NOT_IN

    def closed(v: str, r: str) -> str:
        return gap(tables[v], r) if r.split(":")[0] in rows[v] else NOT_IN

    lines = ["| CE on the teacher's answers (nats; A − B, below 0: A better) | v2: 40 steps × 4 sequences | "
             "v3: 4 passes (209 steps × 4) |", "|---|---|---|"]
    lines += [f"| {q} (`{a}` − `{b}`) | {cmp('v2', a, b)} | {cmp('v3', a, b)} |" for q, a, b in QUESTIONS]
    lines += ["", "| share of the base–teacher CE gap closed | v2 | v3 |", "|---|---|---|"]
    lines += [f"| `{r}` | {closed('v2', r)} | {closed('v3', r)} |" for r in GAP_ROWS]
    lines += ["", "| what a teacher-free gate could select at layers 5, 11, 17 (`toe oracle`, v2's extraction): δ "
              "injected | gap closed |", "|---|---|"]
    lines += [f"| {what} | {closed('v2', row)} |" for what, row in CEILING]
    lines += ["", "95 % intervals: a bootstrap over seeds, then items (GSM8K dev items; over items only for a "
              "one-seed row). Level: the interval includes zero and lies within the studies' equivalence margin "
              f"(`scoring.margin`: {margin(tables['v3'])}); level from: the smallest margin under which it would "
              "read level. – : not a row of that study. The oracle rows inject δ on the extraction's cached states "
              "(the trained map's δ with the live teacher's states; δ̂(h) predicted from the base's state alone; the "
              "mean δ). Rendered by `python runs/real_pair_headline.py` from the studies' `table.json`."]
    return "\n".join(lines) + "\n"


def main() -> None:
    md = render()
    atomic_write_text(os.path.join(ROOT, "results", "real_pair_headline.md"), md)
    put_in_readme(os.path.join(ROOT, "README.md"), "real_pair", md, kind="headline")
    print(md)


if __name__ == "__main__":
    main()
