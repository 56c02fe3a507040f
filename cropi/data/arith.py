"""`builtin:arith`: seeded, verifiable arithmetic prompts.

The default pool mimics what the paper trains on (GSM8K + MATH + DeepScaleR
mixed): several skills at four difficulty levels, so that a partly trained
base policy solves some prompts always, some never and many sometimes; some
skills have nothing to do with a given validation set; and a few references
are wrong (label noise, 5 % by default in a pool), as in scraped datasets.

Query syntax: ``builtin:arith?skills=add,sub&digits=1-3&noise=0.05``. Its errors
name the key, never the value (as the spec's own errors do).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from urllib.parse import parse_qsl

from cropi.data.types import Prompt
from cropi.errors import InputError
from cropi.seeding import stream_seed

# skill -> (prompt text, correct answer, confused answer) for operands drawn
# at `digits` digits. The confused answer is the skill's typical *strategy*
# mistake (the wrong operation, the opposite order): the warm-start corpus
# of the built-in model answers a share of its exercises that way, so the
# base policy knows the right strategy but often prefers the wrong one. That
# is what RLVR sharpens in real models (pass@1 rises towards pass@k), and the
# lesson belongs to one skill: learning that "max" means max teaches nothing
# about "+".
SkillFn = Callable[[random.Random, int], tuple[str, int, int]]


def _number(rng: random.Random, digits: int) -> int:
    if digits == 1:
        return rng.randint(0, 9)
    return rng.randint(10 ** (digits - 1), 10**digits - 1)


def _add(rng: random.Random, d: int) -> tuple[str, int, int]:
    a, b = _number(rng, d), _number(rng, d)
    return f"{a}+{b}=", a + b, a - b


def _sub(rng: random.Random, d: int) -> tuple[str, int, int]:
    a, b = _number(rng, d), _number(rng, d)
    return f"{a}-{b}=", a - b, a + b


def _mul(rng: random.Random, d: int) -> tuple[str, int, int]:
    a, b = _number(rng, d), rng.randint(2, 9)
    return f"{a}*{b}=", a * b, a + b


def _max(rng: random.Random, d: int) -> tuple[str, int, int]:
    a, b = _number(rng, d), _number(rng, d)
    return f"max({a},{b})=", max(a, b), min(a, b)


def _rev(rng: random.Random, d: int) -> tuple[str, int, int]:
    a = _number(rng, d)
    return f"rev({a})=", int(str(a)[::-1]), a


def _sort(rng: random.Random, d: int) -> tuple[str, int, int]:
    a = _number(rng, d)
    digits = sorted(str(a))
    return f"sort({a})=", int("".join(digits)), int("".join(reversed(digits)))


SKILLS: dict[str, SkillFn] = {"add": _add, "sub": _sub, "mul": _mul, "max": _max, "rev": _rev, "sort": _sort}
DIGITS = (1, 2, 3, 4)


def _parse_digits(value: str) -> tuple[int, ...]:
    out: set[int] = set()
    for part in value.split(","):
        lo, _, hi = part.partition("-")
        try:
            lo_i, hi_i = int(lo), int(hi or lo)
        except ValueError:
            raise InputError("builtin:arith: digits must look like '3', '1-4' or '1,3'") from None
        out.update(range(lo_i, hi_i + 1))
    if not out or min(out) < 1 or max(out) > 4:
        raise InputError("builtin:arith: digits must be between 1 and 4")
    return tuple(sorted(out))


def parse_query(query: str) -> dict:
    """Parse the part after '?' into generator options, rejecting unknown keys."""
    opts: dict = {}
    for key, value in parse_qsl(query, keep_blank_values=True, strict_parsing=False):
        if key == "skills":
            skills = tuple(s for s in value.split(",") if s)
            unknown = [s for s in skills if s not in SKILLS]
            if unknown or not skills:
                raise InputError(f"builtin:arith: skills names an unknown skill or none; known: {', '.join(SKILLS)}")
            opts["skills"] = skills
        elif key == "digits":
            opts["digits"] = _parse_digits(value)
        elif key == "noise":
            try:
                opts["noise"] = float(value)
            except ValueError:
                raise InputError("builtin:arith: noise must be a number in [0, 1)") from None
            if not 0 <= opts["noise"] < 1:
                raise InputError("builtin:arith: noise must be in [0, 1)")
        else:
            raise InputError(f"builtin:arith: unknown query key {key!r}; known: skills, digits, noise")
    return opts


def _corrupt(rng: random.Random, answer: int) -> int:
    # Near-miss wrong answers, like an off-by-a-bit label in a scraped dataset.
    return answer + rng.choice([-1, 1]) * rng.randint(1, 10)


def generate(
    size: int,
    seed: int | str,
    skills: tuple[str, ...] = tuple(SKILLS),
    digits: tuple[int, ...] = DIGITS,
    noise: float = 0.0,
) -> list[Prompt]:
    """`size` prompts drawn uniformly over (skill, digits) cells.

    Within a call, a prompt text is not repeated unless its cell has too few
    distinct prompts (1-digit cells hold at most 100).
    """
    rng = random.Random(stream_seed("arith", seed))
    cells = [(s, d) for s in skills for d in digits]
    seen: set[str] = set()
    prompts: list[Prompt] = []
    for i in range(size):
        skill, d = cells[rng.randrange(len(cells))]
        for _ in range(20):
            text, answer, confused = SKILLS[skill](rng, d)
            if text not in seen:
                break
        seen.add(text)
        noisy = rng.random() < noise
        reference = _corrupt(rng, answer) if noisy else answer
        meta = {"skill": skill, "digits": d, "noisy": noisy, "true_answer": str(answer),
                "confused_answer": str(confused)}
        prompts.append(Prompt(id=f"{i:06d}", text=text, answer=str(reference), verifier="int", meta=meta))
    return prompts


def load_builtin_arith(query: str, size: int | None, seed: int | str, default_noise: float) -> list[Prompt]:
    opts = parse_query(query)
    opts.setdefault("noise", default_noise)
    return generate(size or 1000, seed, **opts)
