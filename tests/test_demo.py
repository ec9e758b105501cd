from __future__ import annotations

import pytest

from tree_of_experts import ToEError
from tree_of_experts.recipes.demo import demo


def test_short_demo_closes_a_clear_share_of_the_toy_gap(tmp_path):
    """End-to-end learning test on the shipped toy pair: extract -> train -> eval -> report.

    The full demo (1000 steps) closes about half of the CE gap; this short run must close at least 10 %.
    """
    result = demo(out=str(tmp_path / "demo"), n_train=256, n_dev=48, train_steps=250, stage_a_steps=50,
                  control=False, max_new_tokens=48)
    rows = {r["system"]: r for r in result["rows"]}
    assert rows["teacher"]["ce"] < rows["base"]["ce"] - 0.1  # the toy world has a real gap
    assert rows["ToE"]["ce_gap_closed"]["gap_closed"] > 0.10
    assert (tmp_path / "demo" / "report.md").exists() and (tmp_path / "demo" / "report.png").exists()
    assert (tmp_path / "demo" / "usage.png").exists()
    assert result["summary"].startswith("**") and "| ToE |" in result["summary"]  # the table `toe demo` prints
    before = (tmp_path / "demo" / "report.md").read_bytes()
    with pytest.raises(ToEError, match="--overwrite true"):  # a rerun never replaces an earlier demo silently
        demo(out=str(tmp_path / "demo"))
    assert (tmp_path / "demo" / "report.md").read_bytes() == before
