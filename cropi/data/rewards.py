"""Rewards: `reward(prompt, response)` dispatches on `prompt.verifier`, so a
pool may mix data sources (as verl dispatches its reward score on the data
source). Each verifier maps (response, reference) to 0.0 or 1.0; the table
of verifiers is the one place a reward is looked up, and
`register_verifier` is how another one gets in.

`verifier="auto"` is resolved by the caller before Prompts are built; it is
deliberately not a key here."""

from __future__ import annotations

import math
import numbers
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import Any

from math_verify import parse, verify

from cropi.data.types import Prompt, row_label
from cropi.errors import InputError
from cropi.spec import REWARD_ARITY, JobSpec
from cropi.userfn import is_function_ref, load_function

_INT = re.compile(r"-?\d+")
# An unescaped `$` means the reference already carries its own math delimiters.
_MATH_DELIM = re.compile(r"(?<!\\)\$|\\boxed|\\fbox")
_MATH_TIMEOUT_S = 5


def int_verifier(response: str, reference: str) -> float:
    text = response.strip()
    if not _INT.fullmatch(text):
        return 0.0
    try:
        return float(int(text) == int(reference))
    except ValueError:  # a non-integer reference can never be matched
        return 0.0


def math_gold_text(reference: str) -> str:
    """The reference rewritten so that math-verify's `parse` extracts the answer.

    A bare answer such as `\\sqrt{2}` or `2, 3` must be wrapped: unwrapped,
    math-verify finds nothing in it or grabs the last number (`3\\sqrt{2}` -> 3).
    """
    if "####" in reference:  # GSM8K: worked solution, then "#### 1,234"
        return f"${reference.rsplit('####', 1)[1].strip().replace(',', '')}$"
    if _MATH_DELIM.search(reference):  # MATH solution with \boxed{...}, or $...$
        return reference
    return f"${reference.strip()}$"


def _timeout() -> int | None:
    # math-verify times out with signal.alarm, which raises ValueError off the
    # main thread; there we run without its timeout rather than score everything 0.
    return _MATH_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


@lru_cache(maxsize=65536)
def _parse_gold(reference: str) -> tuple[Any, ...]:
    # Each reference is scored against many responses; parse it once.
    return tuple(parse(math_gold_text(reference), parsing_timeout=_timeout()))


def math_verifier(response: str, reference: str) -> float:
    try:
        gold = _parse_gold(reference)
        if not gold:
            return 0.0
        answer = parse(response, parsing_timeout=_timeout())
        # verify is not symmetric: gold first.
        return float(verify(list(gold), answer, timeout_seconds=_timeout()))
    except Exception:  # a weird response must never crash training
        return 0.0


Verifier = Callable[[str, str], float]  # (response, reference) -> reward
VERIFIERS: dict[str, Verifier] = {"int": int_verifier, "math": math_verifier}


@contextmanager
def register_verifier(name: str, fn: Verifier) -> Iterator[None]:
    """`name` scores with `fn` inside the block (this process only), then with what it had before."""
    before = VERIFIERS.get(name)
    VERIFIERS[name] = fn
    try:
        yield
    finally:
        if before is None:
            VERIFIERS.pop(name, None)
        else:
            VERIFIERS[name] = before


class RewardError(InputError):
    """A user's reward function failed or returned something that is not a number."""


def reward(prompt: Prompt, response: str) -> float:
    """The reward of `response`: a built-in verifier (response, reference), or the user's function
    named `module:function` / `file.py:function`, called as fn(response, reference, row)."""
    fn = VERIFIERS.get(prompt.verifier)
    if fn is not None:
        return fn(response, prompt.answer)
    if not is_function_ref(prompt.verifier):
        raise InputError(
            f"{row_label(prompt)}: unknown verifier {prompt.verifier!r} (known: {', '.join(VERIFIERS)}, "
            "module:function, path/to/file.py:function)")
    return _user_reward(prompt, response)


def _user_reward(prompt: Prompt, response: str) -> float:
    name = prompt.verifier
    where = row_label(prompt)  # never the row's id or values
    try:
        fn = load_function(name, REWARD_ARITY)
    except ValueError as err:
        raise RewardError(f"reward function {name}: {err}") from None
    try:
        value = fn(response, prompt.answer, prompt.meta.get("row", {}))
    except Exception as err:  # the user's code: its failure fails this task, never the worker
        raise RewardError(f"reward function {name} raised {type(err).__name__} on {where}") from err
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value):
        raise RewardError(f"reward function {name} returned a {type(value).__name__}, not a number, on {where}")
    return float(value)


def import_reward_functions(spec: JobSpec, source: str = "spec") -> None:
    """Import every user reward function the spec names now, as `cropi run` does before it starts
    (parsing a spec runs no user code): an InputError naming the field of the first that fails."""
    sources = [("data.pool", spec.data.pool), *((f"data.validation[{i}]", s) for i, s in
                                                 enumerate(spec.data.validation)),
               *((f"data.untargeted[{i}]", s) for i, s in enumerate(spec.data.untargeted))]
    for field, src in sources:
        named = [("verifier", src.verifier), *((f"verifier_by_source[{k!r}]", v)
                                               for k, v in src.verifier_by_source.items())]
        for key, ref in named:
            if ref not in VERIFIERS and is_function_ref(ref):
                try:
                    load_function(ref, REWARD_ARITY)
                except ValueError as err:
                    raise InputError(f"invalid job spec ({source}):\n  {field}.{key}: {err}") from None
