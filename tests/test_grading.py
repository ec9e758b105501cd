"""Answer grading: GSM8K numbers, MATH expressions (math-verify), boxed answers."""

from __future__ import annotations

import pytest

from tree_of_experts.grading import grade, gsm8k_gold, last_boxed, normalize_number


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


@pytest.mark.parametrize("completion,gold,pred,ok", [
    ("so she pays $1,234.", "1234", "1234", True),
    ("The answer is -7", "-7", "-7", True),
    ("It costs $18.00 in total.", "18", "18", True),
    ("half is 0.5", "0.5", "0.5", True),
    ("first 3 then 4 #### 12 apples", "12", "12", True),
    ("2 + 2 = 5", "4", "5", False),
    ("no idea", "4", None, False),
    ("1,000,000 grains", "1000000", "1000000", True),
])
def test_gsm8k_grading(completion, gold, pred, ok):
    assert grade("gsm8k", completion, gold) == (pred, ok)


def test_gsm8k_gold_and_normalisation():
    assert gsm8k_gold("48/2 = <<48/2=24>>24\n#### 72") == "72"
    assert gsm8k_gold("no marker") is None
    assert normalize_number("$3.50") == "3.5" and normalize_number("-3.") == "-3" and normalize_number("x") is None


@pytest.mark.parametrize("completion,gold,ok", [
    (r"so \boxed{\frac{1}{2}}", r"\frac12", True),
    (r"\boxed{0.5}", r"\frac{1}{2}", True),
    (r"\boxed{\left( 3, \frac{\pi}{2} \right)}", r"\left( 3, \frac{\pi}{2} \right)", True),
    (r"\boxed{3}", "4", False),
    ("no box here", "4", False),
])
def test_math_grading(completion, gold, ok):
    assert grade("math", completion, gold)[1] is ok


def test_last_boxed_balances_braces():
    assert last_boxed(r"\boxed{1} then \boxed{\frac{a}{b}} end") == r"\frac{a}{b}"
    assert last_boxed(r"\boxed{unclosed") is None
