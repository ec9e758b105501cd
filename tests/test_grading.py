from __future__ import annotations

import pytest

from tree_of_experts.grading import grade, last_boxed


@pytest.mark.parametrize("completion,gold,pred,ok", [
    (r"so \boxed 5", "5", "5", True),  # no braces: the hand-written extraction found nothing
    (r"\boxed 5, see {x}", "5", "5", True),  # it took the later brace group "x"
    (r"\boxed 5, see {x}", "x", "5", False),
    (r"the answer is \boxed{\dfrac{2}{4}}.", r"\frac12", r"\frac{2}{4}", True),
    (r"Final answer: $\frac{3}{4}$", "0.75", r"\frac{3}{4}", True),  # no box: the last expression
    ("I give up.", "4", None, False),
])
def test_math_grading_reads_the_whole_completion(completion, gold, pred, ok):
    assert grade("math", completion, gold) == (pred, ok)


def test_the_old_extraction_misses_what_math_verify_reads():
    # The cases above are the ones `\boxed{...}` extraction by hand gets wrong, so they can fail.
    assert last_boxed(r"so \boxed 5") is None
    assert last_boxed(r"\boxed 5, see {x}") == "x"


def test_math_gold_that_does_not_parse_is_compared_as_text():
    assert grade("math", r"\boxed{\text{Tuesday}}", r"\text{Tuesday}")[1]
    assert not grade("math", r"\boxed{\text{Monday}}", r"\text{Tuesday}")[1]
