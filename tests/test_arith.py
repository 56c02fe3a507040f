"""builtin:arith: seeded, verifiable, spread in difficulty, a little noisy."""

from collections import Counter

import pytest

from cropi.data import arith
from cropi.data.rewards import reward
from cropi.errors import InputError


def test_same_seed_same_prompts_other_seed_other_prompts():
    a = arith.generate(200, seed=1)
    assert a == arith.generate(200, seed=1)
    assert [p.text for p in a] != [p.text for p in arith.generate(200, seed=2)]


@pytest.mark.parametrize("skill", list(arith.SKILLS))
def test_every_clean_reference_is_the_true_answer(skill):
    for p in arith.generate(300, seed=0, skills=(skill,)):
        assert p.meta["skill"] == skill and not p.meta["noisy"]
        assert p.answer == p.meta["true_answer"]
        # Recompute independently of the generator.
        expr = p.text.rstrip("=")
        if skill in ("add", "sub", "mul"):
            expected = eval(expr)  # noqa: S307 - digits and one operator only
        else:
            arg = expr[expr.index("(") + 1 : -1]
            if skill == "max":
                expected = max(int(x) for x in arg.split(","))
            elif skill == "rev":
                expected = int(arg[::-1])
            else:
                expected = int("".join(sorted(arg)))
        assert int(p.answer) == expected, p


def test_digits_control_operand_length():
    for p in arith.generate(100, seed=0, skills=("add",), digits=(3,)):
        a, b = p.text.rstrip("=").split("+")
        assert len(a) == 3 and len(b) == 3


def test_default_mix_covers_every_skill_and_difficulty():
    cells = Counter((p.meta["skill"], p.meta["digits"]) for p in arith.generate(4000, seed=0))
    assert set(cells) == {(s, d) for s in arith.SKILLS for d in arith.DIGITS}
    assert min(cells.values()) > 100


def test_label_noise_is_about_the_requested_fraction_and_really_wrong():
    prompts = arith.generate(4000, seed=0, noise=0.05)
    noisy = [p for p in prompts if p.meta["noisy"]]
    assert 0.04 < len(noisy) / len(prompts) < 0.06
    for p in noisy:
        assert p.answer != p.meta["true_answer"]
        assert reward(p, p.meta["true_answer"]) == 0.0


def test_query_selects_skills_and_digits():
    opts = arith.parse_query("skills=add,mul&digits=1-2,4&noise=0.1")
    assert opts == {"skills": ("add", "mul"), "digits": (1, 2, 4), "noise": 0.1}


@pytest.mark.parametrize(
    "query, fragment",
    [("skills=pow", "unknown skill"), ("digits=5", "between 1 and 4"), ("digits=x", "digits must look like"),
     ("noise=2", "noise must be in"), ("colour=red", "unknown query key")],
)
def test_bad_queries_are_input_errors(query, fragment):
    with pytest.raises(InputError, match=fragment):
        arith.parse_query(query)


def test_reward_is_exact_integer_match():
    p = arith.generate(1, seed=0, skills=("add",), digits=(2,))[0]
    assert reward(p, p.answer) == 1.0
    assert reward(p, str(int(p.answer) + 1)) == 0.0
    assert reward(p, p.answer + "x") == 0.0
