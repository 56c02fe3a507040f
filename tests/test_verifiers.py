"""Verifiers: the exact-integer check for builtin tasks, and math-verify on
references in the formats real datasets use (GSM8K `#### n`, MATH `\\boxed{}`,
bare answers)."""

from __future__ import annotations

import threading

import pytest

from cropi.data.types import Prompt
from cropi.data.rewards import (
    VERIFIERS,
    int_verifier,
    math_gold_text,
    math_verifier,
    reward,
)
from cropi.errors import InputError


@pytest.mark.parametrize(
    ("response", "reference", "expected"),
    [
        ("21", "21", 1.0),
        ("021", "21", 1.0),
        ("21 ", "21", 1.0),
        ("\n 21\n", "21", 1.0),
        ("-7", "-7", 1.0),
        ("7", "-7", 0.0),
        ("22", "21", 0.0),
        ("21a", "21", 0.0),
        ("", "21", 0.0),
        ("2 1", "21", 0.0),
        ("+21", "21", 0.0),
        ("21.0", "21", 0.0),
        ("The answer is 21", "21", 0.0),
        ("21", "not a number", 0.0),
    ],
)
def test_int_verifier(response: str, reference: str, expected: float) -> None:
    assert int_verifier(response, reference) == expected


GSM8K_NATALIA = (
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
    "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72"
)
GSM8K_WENG = (
    "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\n"
    "Working 50 minutes, she earned 0.2 x 50 = $<<0.2*50=10>>10.\n#### 10"
)
GSM8K_BETTY = (
    "In the beginning, Betty has only 100 / 2 = $<<100/2=50>>50.\n"
    "Betty's grandparents gave her 15 * 2 = $<<15*2=30>>30.\n"
    "This means, Betty needs 100 - 50 - 30 - 15 = $<<100-50-30-15=5>>5 more.\n#### 5"
)
GSM8K_THOUSANDS = "They sold 617 * 2 = <<617*2=1234>>1234 in total.\n#### 1,234"


@pytest.mark.parametrize(
    ("reference", "response", "expected"),
    [
        (GSM8K_NATALIA, "The answer is 72", 1.0),
        (GSM8K_NATALIA, "48 + 24 = 72, so \\boxed{72}", 1.0),
        (GSM8K_NATALIA, "She sold 72 clips in total. #### 72", 1.0),
        (GSM8K_NATALIA, "The answer is 24", 0.0),
        (GSM8K_NATALIA, "\\boxed{48}", 0.0),
        (GSM8K_WENG, "She earned $10.", 1.0),
        (GSM8K_WENG, "\\boxed{10.00}", 1.0),
        (GSM8K_WENG, "\\boxed{0.2}", 0.0),
        (GSM8K_BETTY, "Betty needs 5 more dollars.", 1.0),
        (GSM8K_BETTY, "The answer is 15", 0.0),
        (GSM8K_THOUSANDS, "1234", 1.0),
        (GSM8K_THOUSANDS, "The total is \\boxed{1,234}.", 1.0),
        (GSM8K_THOUSANDS, "1243", 0.0),
    ],
)
def test_math_gsm8k_references(reference: str, response: str, expected: float) -> None:
    assert math_verifier(response, reference) == expected


MATH_HALF = "We divide both sides by 4 to get $x = \\boxed{\\frac{1}{2}}$."
MATH_POLAR = (
    "We have that $r = \\sqrt{0^2 + 3^2} = 3.$ Also, the point makes an angle of "
    "$\\frac{\\pi}{2}$ with the positive $x$-axis, so the polar coordinates are "
    "$\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}.$"
)


@pytest.mark.parametrize(
    ("reference", "response", "expected"),
    [
        # full MATH solutions with \boxed{}
        (MATH_HALF, "$\\frac{2}{4}$", 1.0),
        (MATH_HALF, "So $x = \\boxed{0.5}$", 1.0),
        (MATH_HALF, "\\boxed{\\frac{1}{3}}", 0.0),
        (MATH_POLAR, "The answer is $\\boxed{(3, \\frac{\\pi}{2})}$", 1.0),
        (MATH_POLAR, "\\boxed{(3, \\pi)}", 0.0),
        (MATH_POLAR, "\\boxed{(\\frac{\\pi}{2}, 3)}", 0.0),
        # bare boxed references
        ("\\boxed{\\frac{1}{2}}", "$\\frac{2}{4}$", 1.0),
        ("\\boxed{\\sqrt{2}}", "Thus the length is $\\boxed{\\sqrt 2}$.", 1.0),
        ("\\boxed{\\sqrt{2}}", "\\boxed{2}", 0.0),
        ("\\boxed{(3, \\frac{\\pi}{2})}", "$\\left(3, \\frac{\\pi}{2}\\right)$", 1.0),
        # bare answers, as in many MATH-derived datasets' `answer` column
        ("\\frac{1}{2}", "\\boxed{\\dfrac12}", 1.0),
        ("3", "The answer is $\\boxed{3}$.", 1.0),
        ("3", "\\boxed{4}", 0.0),
        ("\\sqrt{2}", "\\boxed{\\sqrt{2}}", 1.0),
        ("3\\sqrt{2}", "\\boxed{3}", 0.0),
        ("3\\sqrt{2}", "\\boxed{\\sqrt{18}}", 1.0),
        ("2, 3", "\\boxed{3, 2}", 1.0),
        ("x^2+1", "\\boxed{1 + x^2}", 1.0),
        ("\\$18.90", "\\boxed{18.90}", 1.0),
    ],
)
def test_math_math_references(reference: str, response: str, expected: float) -> None:
    assert math_verifier(response, reference) == expected


def test_math_gold_text_normalisation() -> None:
    assert math_gold_text(GSM8K_THOUSANDS) == "$1234$"
    assert math_gold_text("\\sqrt{2}") == "$\\sqrt{2}$"
    assert math_gold_text("\\$18.90") == "$\\$18.90$"  # escaped dollar is not a delimiter
    assert math_gold_text(MATH_HALF) == MATH_HALF


@pytest.mark.parametrize(
    "response",
    ["", "   ", "asdf }{ \\boxed{", "\\frac{", "$$$$", "\\boxed{\\boxed{\\boxed{", "\x00\xff", "1/0", "\\boxed{1/0}", "é" * 1000],
)
def test_math_garbage_response_scores_zero(response: str) -> None:
    assert math_verifier(response, GSM8K_NATALIA) == 0.0


def test_math_unparsable_reference_scores_zero() -> None:
    assert math_verifier("72", "") == 0.0


def test_math_verifier_works_off_the_main_thread() -> None:
    # math-verify's default signal-based timeout raises ValueError in threads;
    # that must not turn every reward into 0.
    out: list[float] = []
    t = threading.Thread(target=lambda: out.append(math_verifier("\\boxed{72}", GSM8K_NATALIA)))
    t.start()
    t.join()
    assert out == [1.0]


def test_reward_dispatches_on_verifier() -> None:
    assert set(VERIFIERS) == {"int", "math"}
    assert reward(Prompt(id="a", text="2+2=", answer="4", verifier="int"), "4") == 1.0
    assert reward(Prompt(id="a", text="2+2=", answer="4", verifier="int"), "four") == 0.0
    assert reward(Prompt(id="b", text="q", answer=GSM8K_NATALIA, verifier="math"), "So 72.") == 1.0
    # The int verifier would reject this response; math extracts the answer.
    assert reward(Prompt(id="c", text="q", answer="72", verifier="int"), "The answer is 72") == 0.0
    assert reward(Prompt(id="c", text="q", answer="72", verifier="math"), "The answer is 72") == 1.0


@pytest.mark.parametrize("name", ["auto", "nope"])
def test_reward_unknown_verifier(name: str) -> None:
    with pytest.raises(InputError, match=rf"unknown verifier '{name}'.*int, math"):
        reward(Prompt(id="x", text="q", answer="1", verifier=name), "1")
