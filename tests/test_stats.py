"""stats: intervals, gap closed, paired bootstrap."""

from __future__ import annotations

import pytest

from tree_of_experts.stats import gap_closed, gap_closed_ci, paired_bootstrap, wilson


def test_wilson_interval():
    lo, hi = wilson(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-3) and hi == pytest.approx(0.7634, abs=1e-3)
    assert wilson(0, 10)[0] == 0.0


def test_gap_arithmetic():
    assert gap_closed(1.0, 1.2, 0.8) == pytest.approx(0.5)  # CE: lower is better, signs cancel
    assert gap_closed(0.3, 0.2, 0.6) == pytest.approx(0.25)  # accuracy
    assert gap_closed(0.3, 0.2, 0.2) is None  # no gap: undefined, never a division by noise
    r = gap_closed_ci([1.0] * 20, [1.2] * 20, [0.8] * 20)
    assert r["gap_closed"] == pytest.approx(0.5) and r["defined"] and not r["format_adaptation_flag"]
    assert gap_closed_ci([0.5] * 20, [1.2] * 20, [0.8] * 20)["format_adaptation_flag"]


def test_paired_bootstrap():
    r = paired_bootstrap([1.0, 2.0, 3.0, 4.0], [0.0, 1.0, 2.0, 3.0])
    assert r["mean_diff"] == 1.0 and r["ci95"] == [1.0, 1.0] and r["p_positive"] == 1.0
    with pytest.raises(ValueError, match="same items"):
        paired_bootstrap([1.0], [1.0, 2.0])
