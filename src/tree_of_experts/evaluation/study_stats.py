"""A study's numbers: per-item scores aligned across rows and seeds, intervals and paired comparisons, and the words
of the verdict (never typed by hand).

Rows × seeds × items is a crossed design; the intervals come from a bootstrap that resamples the training seeds of
each row and, independently, the items (the "pigeonhole" bootstrap of crossed designs, Owen 2007): with several
seeds a row's interval holds both sources of variation. With one seed it holds the items' alone, and with two the
seeds' part is under-estimated (a resample of two seeds is often one seed twice): the readings say so. Rows scored
on the same seeds share the seed draw, so seed k of one row meets seed k of the other (the same data order):
comparisons are paired on seeds as well as items; rows with other seed sets are drawn independently. The base and
the teacher have one "seed" each (they are not trained). Below three items an interval is undefined (None).

The verdict reads each named comparison by one fixed rule: a difference whose 95 % interval excludes zero is a
difference (with its direction); one whose interval includes zero is "level" only when the whole interval lies within
the target's equivalence margin (``scoring.margin``: by default 2 % of the base-teacher gap, a fifth of what a
trained row closes on the real pair; or ``scoring.margins``), and "not resolved" when it reaches beyond it (too few
items or seeds to tell a tie from a difference that matters). Each such comparison also carries ``level_from``, the
smallest margin under which it would read level, for a reader with another margin in mind. Its words come from here
alone.
"""

from __future__ import annotations

import json
import math
import os
import zlib

import torch

from ..stats import MIN_INTERVAL_N

ITERS = 2000


METRIC = {"acc": "correct"}  # the per-item field each target folder is read by (default: ce)


LOWER_IS_BETTER = {"acc": False}  # CE targets: lower is better


# -- per-item scores -----------------------------------------------------------------------------------------------
def _items(path: str, field: str) -> dict[str, float]:
    """{item key: value} of one system's per-item JSONL (key: the prompt, numbered when it repeats)."""
    out: dict[str, float] = {}
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            v = r.get(field)
            if v is None:
                continue
            key, k = str(r.get("prompt")), 1
            while key in out:
                key, k = f"{r.get('prompt')}#{k}", k + 1
            out[key] = float(v)
    return out


def load_target(study, target: str) -> tuple[dict[str, list[dict[str, float]]], dict[str, tuple[int, ...]]]:
    """{row: [per-seed {item: value}]} of one target: ``base`` and ``teacher`` from the anchors, every scored seed
    of every row, and each oracle system as a row ``ORACLE:SYSTEM``; and {row: the training seeds it has}."""
    root, field = os.path.join(study.out, target), METRIC.get(target, "ce")
    out: dict[str, list[dict[str, float]]] = {}
    seed_ids: dict[str, tuple[int, ...]] = {}

    def read(folder: str, system: str) -> dict[str, float] | None:
        path = os.path.join(root, folder, f"{system}.jsonl")
        done = os.path.isfile(os.path.join(root, folder, "metrics.json"))
        return _items(path, field) if done and os.path.isfile(path) else None

    for name, folder in (("base", "anchors"), ("teacher", "anchors" if target != "acc" else "teacher")):
        got = read(folder, name)
        if got:
            out[name] = [got]
    for row in study.cfg.rows:
        if row.kind == "oracle":
            folder = os.path.join(root, row.labels()[0])
            for f in sorted(os.listdir(folder)) if os.path.isfile(os.path.join(folder, "metrics.json")) else []:
                system = f[: -len(".jsonl")]
                if f.endswith(".jsonl") and system not in ("base", "teacher", "generation"):
                    out[f"{row.name}:{system}"] = [read(row.labels()[0], system)]
            continue
        system = "lora" if row.kind == "lora" else "toe"
        seeds = {k: read(label, system) for k, label in enumerate(row.labels())}
        seeds = {k: v for k, v in seeds.items() if v}
        if seeds:
            out[row.name] = list(seeds.values())
            seed_ids[row.name] = tuple(seeds)
    return out, seed_ids


def aligned(scores: dict[str, list[dict[str, float]]]) -> tuple[list[str], dict[str, torch.Tensor]]:
    """The items every scored row has, and each row's (S, I) values on them."""
    keys = None
    for seeds in scores.values():
        for s in seeds:
            keys = set(s) if keys is None else keys & set(s)
    keys = sorted(keys or ())
    return keys, {row: torch.tensor([[s[k] for k in keys] for s in seeds], dtype=torch.float64)
                  for row, seeds in scores.items()}


# -- the two-level bootstrap ---------------------------------------------------------------------------------------
class Draws:
    """Bootstrap draws shared by every row of a target: items (B, I), and seeds (B, S) per seed count S."""

    def __init__(self, n_items: int, seed: int = 0, iters: int = ITERS):
        self.seed, self.iters = seed, iters
        g = torch.Generator().manual_seed(seed)
        self.items = torch.randint(n_items, (iters, n_items), generator=g) if n_items else None
        self.seeds: dict = {}

    def means(self, x: torch.Tensor, seeds: tuple[int, ...] | None = None) -> torch.Tensor:
        """(B,) resampled means of ``x`` (S, I): seeds, then items. Rows with the same ``seeds`` (the training seeds
        they hold, in order) share the seed draw: they are paired on seeds. Each seed draw comes from its own key,
        so a row's interval does not move when other rows are scored. No items: NaN (no interval)."""
        s = x.shape[0]
        if self.items is None:
            return torch.full((self.iters,), math.nan, dtype=torch.float64)
        key = seeds if seeds is not None else s
        if key not in self.seeds:
            g = torch.Generator().manual_seed(self.seed + 1 + zlib.crc32(repr(key).encode()))
            self.seeds[key] = torch.randint(s, (self.iters, s), generator=g) if s > 1 else \
                torch.zeros(self.iters, 1, dtype=torch.long)
        v = x[self.seeds[key]]  # (B, S, I)
        return v.gather(2, self.items[:, None, :].expand(-1, s, -1)).mean((1, 2))


def interval(draws: torch.Tensor, point: float, n_items: int) -> dict:
    """The point and the 95 % percentile interval of ``draws``; none below MIN_INTERVAL_N items or when over a
    tenth of the draws are not finite (a point that is not finite is None too: JSON has no NaN)."""
    ok = draws[torch.isfinite(draws)]
    point = point if math.isfinite(point) else None
    if n_items < MIN_INTERVAL_N or len(ok) < 0.9 * len(draws) or point is None:
        return {"point": point, "ci95": [None, None]}
    return {"point": point, "ci95": [float(ok.quantile(0.025)), float(ok.quantile(0.975))]}


def gap(x: torch.Tensor, base: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    return (x - base) / (teacher - base)


def equivalence_margin(study, target: str, point: dict[str, float]) -> float | None:
    """The smallest difference on ``target`` that matters: ``scoring.margins[target]`` when given, else
    ``scoring.margin`` × |teacher − base| (both scored on the target); None when neither is known."""
    given = study.cfg.scoring.margins.get(target)
    if given is not None:
        return float(given)
    gap_ = point["teacher"] - point["base"] if "base" in point and "teacher" in point else math.nan
    return study.cfg.scoring.margin * abs(gap_) if math.isfinite(gap_) and gap_ != 0 else None


def target_table(study, target: str) -> dict:
    """Every row's statistic on ``target`` with seed + item intervals and its per-seed values, and the named
    comparisons. CE on the teacher's answers (``ce``, and each of ``scoring.answer_sets``): the gap closed
    (row - base) / (teacher - base); accuracy: the share correct; other CE targets: the row minus the base."""
    teachers_answers = target == "ce" or target in study.cfg.scoring.answer_sets
    scores, ids = load_target(study, target)
    keys, x = aligned(scores)
    n = len(keys)
    d = Draws(n)
    means = {row: d.means(v, ids.get(row, tuple(range(v.shape[0])))) for row, v in x.items()}
    point = {row: float(v.mean()) for row, v in x.items()}
    per_seed = {row: v.mean(1).tolist() for row, v in x.items()}
    rows: dict[str, dict] = {}
    for row, v in x.items():
        entry = {"seeds": v.shape[0], "items": n, "mean": interval(means[row], point[row], n),
                 "per_seed": per_seed[row]}
        if teachers_answers and "base" in x and "teacher" in x and row not in ("base", "teacher"):
            b, t = point["base"], point["teacher"]
            entry["gap_closed"] = interval(gap(means[row], means["base"], means["teacher"]), (point[row] - b) / (t - b), n)
            entry["gap_closed"]["per_seed"] = [(s - b) / (t - b) for s in per_seed[row]]
        elif target not in ("ce", "acc") and "base" in x and row != "base":
            entry["minus_base"] = interval(means[row] - means["base"], point[row] - point["base"], n)
        rows[row] = entry
    margin = equivalence_margin(study, target, point)
    comparisons = []
    for text in study.cfg.compare:
        a, b = (s.strip() for s in text.split(" - "))
        if a in x and b in x:
            diff = interval(means[a] - means[b], point[a] - point[b], n)
            seeds = [x[a].shape[0], x[b].shape[0]]
            diff["margin"], diff["level_from"] = margin, level_from(diff)
            comparisons.append({"a": a, "b": b, "seeds": seeds, "items": n, **diff,
                                "paired_on_seeds": min(seeds) > 1 and ids.get(a) == ids.get(b),
                                "reading": reading(diff, target, a, b) + coverage(seeds, untrained=":" in a + b)})
    return {"target": target, "items": n, "rows": rows, "comparisons": comparisons}


def coverage(seeds: list[int], untrained: bool = False) -> str:
    """What the interval of a comparison between rows with these seed counts covers, when it is not both sources
    (``untrained``: a side is an oracle's system, which no training seed moves)."""
    if untrained and min(seeds) == 1:
        return "; over items (an oracle: one run)"
    if max(seeds) == 1:
        return "; items only: one training seed"
    if min(seeds) == 1:
        return "; one side has one training seed (its seed variation is not in the interval)"
    if min(seeds) == 2:
        return "; 2 seeds: their variation under-estimated"
    return ""


def verdict_word(diff: dict, target: str) -> str:
    """The fixed rule: an interval that excludes zero is a difference ("better"/"worse" for the first row, by the
    target's direction); one that includes it is "level" when it lies within ±``diff["margin"]`` (the target's
    equivalence margin), "unresolved" when it reaches beyond, and "no_margin" when the target has none; without an
    interval, "undefined"."""
    lo, hi = diff["ci95"]
    if lo is None:
        return "undefined"
    if lo <= 0 <= hi:
        m = diff.get("margin")
        return "no_margin" if m is None else "level" if -m <= lo and hi <= m else "unresolved"
    return "better" if (hi < 0) == LOWER_IS_BETTER.get(target, True) else "worse"


def level_from(diff: dict) -> float | None:
    """The smallest margin under which ``diff`` would read level (its interval's farthest end from zero), for an
    interval that includes zero; else None. A reader with another margin in mind applies it here."""
    lo, hi = diff["ci95"]
    return max(-lo, hi) if lo is not None and lo <= 0 <= hi else None


def reading(diff: dict, target: str, a: str, b: str) -> str:
    """:func:`verdict_word` as a sentence."""
    word, m = verdict_word(diff, target), diff.get("margin")
    if word == "undefined":
        return "undefined (too few items for an interval, or scores that are not finite)"
    if word == "level":
        return f"{a} and {b} are level (the interval includes zero and lies within the margin)"
    if word == "unresolved":
        return f"{a} − {b} is not resolved (the interval includes zero but reaches beyond the margin)"
    if word == "no_margin":
        return f"{a} − {b} includes zero (this target has no margin: set scoring.margins to read level)"
    small = m is not None and max(abs(diff["ci95"][0]), abs(diff["ci95"][1])) <= m
    return f"{a} is {word} than {b} (the interval excludes zero" + (", but lies within the margin)" if small else ")")
