"""The math verifier on a table of tricky answers: where the final answer is
found, how numbers are read, and when two of them match."""

from __future__ import annotations

from fractions import Fraction

import pytest

from services.reward.math_verifier import final_answer, has_answer_marker, verify

GSM8K_SOLUTION = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
                  "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72")


@pytest.mark.parametrize("text, expected", [
    # where the answer is
    ("#### 42", 42),
    ("She pays 3 * 4 = 12 dollars.\n#### 12", 12),
    ("first 5, then 7 #### 7 (after 9 tries)", 7),  # the first number after the marker
    ("#### 3\nwait, no: #### 4", 4),  # the last marker
    ("so the answer is \\boxed{18}. Check: 18 - 2 = 16", 18),  # the box wins over later numbers
    ("\\boxed{1} first, then \\boxed{2}", 2),  # the last box
    ("\\boxed{x = 5}", 5),
    ("\\boxed{18 \\text{ dollars}}", 18),
    ("\\boxed{\\{3\\}}", 3),  # nested braces balance
    ("Step 1: 3 apples. Step 2: 4 more. Total: 7 apples.", 7),  # the last number
    ("<think>maybe 9, maybe 10</think>The answer is 11", 11),  # reasoning skipped
    ("<think>it is 9</think>no number after the thinking", None),
    # how numbers read
    ("The answer is 1,234.", 1234),
    ("It costs $1,234.50 in total", Fraction(246_900, 200)),
    ("1{,}000 people", 1000),
    ("about 15% of them", 15),
    ("\\$18.00", 18),
    ("the change is -5", -5),
    ("the change is \u22127", -7),  # Unicode minus
    ("5-3=2", 2),  # a minus between operands is no sign
    ("x-3", 3),
    ("(2)-3", 3),
    ("She ate 3/4.", Fraction(3, 4)),
    ("\\boxed{\\frac{3}{4}}", Fraction(3, 4)),
    ("\\boxed{-\\frac{1}{2}}", Fraction(-1, 2)),
    ("\\boxed{\\dfrac{10}{4}}", Fraction(5, 2)),
    ("answer: .5", Fraction(1, 2)),
    ("2e3 grams", 2000),
    ("0.1 + 0.2 gives 0.30000000000000004", Fraction("0.30000000000000004")),
    ("lists like 1,2,3", 3),  # not a thousands separator
    ("1,2345", 2345),
    # not answers
    ("no number at all", None),
    ("Q3 results", None),  # a number glued to a word is a name
    ("3/0", None),  # a division by zero is no number
    ("1e999", None),  # exponents are bounded
    ("9" * 100, None),  # so is a number's length
    ("\\boxed{}", None),  # an empty box is no answer (no fallback to other numbers)
    ("\\boxed{12", 12),  # an unclosed box is no box: the last number
])
def test_final_answer_table(text, expected):
    assert final_answer(text) == (None if expected is None else Fraction(expected))


@pytest.mark.parametrize("completion, reference, correct", [
    ("#### 72", GSM8K_SOLUTION, True),  # a GSM8K solution as the reference
    ("They sold 72 clips.", "72", True),
    ("#### 72.0", "72", True),
    ("#### 71", "72", False),
    ("\\boxed{0.75}", "3/4", True),
    ("\\boxed{\\frac{3}{4}}", "0.75", True),
    ("#### 0.333", "1/3", False),  # beyond the tolerance
    ("#### 1,000,000.0000001", "1000000", True),  # relative tolerance on large answers
    ("#### 0.0000001", "0", True),  # absolute below 1
    ("#### 0.001", "0", False),
    ("#### -4", "4", False),  # signs count
    ("$5", "5.00", True),
    ("the answer is 50%", "50", True),
    ("no answer here", "5", False),
])
def test_verify_table(completion, reference, correct):
    assert verify(completion, reference).correct is correct


def test_tolerance_is_configurable():
    assert verify("#### 0.333", "1/3", tolerance=1e-2).correct
    assert not verify("#### 72.5", "72", tolerance=0).correct
    assert verify("#### 72", "72", tolerance=0).correct


def test_a_reference_without_a_number_is_refused():
    with pytest.raises(ValueError, match="holds no number"):
        verify("#### 1", "forty-two")


@pytest.mark.parametrize("text, present", [
    ("#### 42", True),
    ("the answer is \\boxed{42}", True),
    ("the answer is 42", False),
    ("#### forty-two", False),
    ("\\boxed{}", False),
    ("<think>#### 1</think> 42", False),  # the marker must be in the answer, not the reasoning
])
def test_answer_marker(text, present):
    assert has_answer_marker(text) is present


@pytest.mark.parametrize("text, expected", [
    ("1," * 50_000 + "7", 7),
    ("9" * 200_000, None),
    ("-" * 100_000 + "3", -3),
    ("\\boxed{" * 20_000, None),
    (" /" * 50_000 + "2", 2),
    ("\\frac{" * 20_000 + "1", 1),
])
def test_hostile_text_is_read(text, expected):
    # long runs that would make a backtracking pattern or an exact number
    # blow up: every pattern here is linear, numbers are bounded
    assert final_answer(text) == (None if expected is None else Fraction(expected))


def test_fractions_with_long_runs_of_spaces_parse_without_backtracking():
    # The old \frac pattern let three parts compete for the same spaces: 4,000 took 30 s (a hang here).
    assert final_answer("\\frac{" + " " * 20_000 + "x") is None
    assert final_answer("\\frac{1}{" + " " * 5_000 + "x") == Fraction(1)
    assert final_answer("so \\frac{ 3 }{ 4 }") == Fraction(3, 4)
