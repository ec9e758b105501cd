"""Small-sample statistics: Wilson and bootstrap intervals, paired comparisons, gap closed.

Bootstrap intervals need a few items: below ``MIN_INTERVAL_N`` the resampled means take at most 3 distinct values
(1 for one item, a zero-width "interval"), so the interval is reported as undefined (None bounds), never as a
number. Wilson's score interval is defined for any n >= 1 and stays.
"""

from __future__ import annotations

import math
from typing import Any

import torch

MIN_INTERVAL_N = 3


def finite_values(rows: list[dict[str, Any]], key: str) -> list[float] | None:
    """[float(row[key])] when every row has a finite value there, else None (a NaN/inf/missing value must be
    flagged, not averaged into a number)."""
    out = []
    for r in rows:
        v = r.get(key)
        if v is None or isinstance(v, str) or not math.isfinite(float(v)):
            return None
        out.append(float(v))
    return out


def nonfinite_count(rows: list[dict[str, Any]], key: str) -> int:
    """Rows whose ``key`` is missing, null, NaN or infinite."""
    return sum(1 for r in rows if r.get(key) is None or not math.isfinite(float(r[key])))


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval for a proportion."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def bootstrap_mean(values: list[float], iters: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean and 95 % percentile-bootstrap interval over items (bounds None below ``MIN_INTERVAL_N`` items)."""
    v = torch.tensor(values, dtype=torch.float64)
    if len(v) == 0:
        return (float("nan"),) * 3
    if len(v) < MIN_INTERVAL_N:
        return float(v.mean()), None, None
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(v), (iters, len(v)), generator=g)
    means = v[idx].mean(1)
    return float(v.mean()), float(means.quantile(0.025)), float(means.quantile(0.975))


def paired_bootstrap(a: list[float], b: list[float], iters: int = 2000, seed: int = 0) -> dict:
    """Mean of a - b on the same items with a 95 % interval and the share of resamples where a - b > 0 (both None
    below ``MIN_INTERVAL_N`` items)."""
    if len(a) != len(b):
        raise ValueError(f"paired comparison needs the same items: {len(a)} vs {len(b)}")
    d = torch.tensor(a, dtype=torch.float64) - torch.tensor(b, dtype=torch.float64)
    if len(d) < MIN_INTERVAL_N:
        return {"mean_diff": float(d.mean()) if len(d) else None, "ci95": [None, None], "p_positive": None,
                "n": len(d)}
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(d), (iters, len(d)), generator=g)
    means = d[idx].mean(1)
    return {"mean_diff": float(d.mean()), "ci95": [float(means.quantile(0.025)), float(means.quantile(0.975))],
            "p_positive": float((means > 0).double().mean()), "n": len(d)}


def gap_closed(system: float, base: float, teacher: float, min_gap: float = 1e-9) -> float | None:
    """(system - base) / (teacher - base); None when the teacher is not measurably different from the base."""
    gap = teacher - base
    if abs(gap) <= min_gap:
        return None
    return (system - base) / gap


def gap_closed_ci(system: list[float], base: list[float], teacher: list[float], iters: int = 2000,
                  seed: int = 0) -> dict:
    """Gap closed on per-item values with a paired bootstrap interval (items resampled jointly)."""
    s, b, t = (torch.tensor(x, dtype=torch.float64) for x in (system, base, teacher))
    point = gap_closed(float(s.mean()), float(b.mean()), float(t.mean()))
    if len(s) < MIN_INTERVAL_N:
        return {"gap_closed": point, "ci95": [None, None], "teacher_minus_base_ci95": [None, None],
                "defined": False, "format_adaptation_flag": point is not None and point > 1.0}
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(s), (iters, len(s)), generator=g)
    gaps = (t[idx].mean(1) - b[idx].mean(1))
    ok = gaps.abs() > 1e-9
    ratios = (s[idx].mean(1) - b[idx].mean(1))[ok] / gaps[ok]
    ci = [float(ratios.quantile(0.025)), float(ratios.quantile(0.975))] if ok.any() else [None, None]
    # A gap whose own interval crosses zero makes the ratio meaningless: report it, don't divide by noise.
    gap_ci = [float(gaps.quantile(0.025)), float(gaps.quantile(0.975))]
    return {"gap_closed": point, "ci95": ci, "teacher_minus_base_ci95": gap_ci,
            "defined": point is not None and (gap_ci[0] > 0 or gap_ci[1] < 0),
            "format_adaptation_flag": point is not None and point > 1.0}
