"""Stage selectors: which pool prompts a stage trains on (docs/design.md §2.5).

All selectors share one signature so that the curriculum loop and the
acceleration benchmark can swap them:

    select(ctx: SelectionContext) -> Selection

`cropi` and `influence_once` need influence scores; the heuristics need only
the offline pass rates; `full`, `random` and `dynamic` need neither.

A selector named `<x>_once` makes selector `<x>`'s choice at stage 0 and
keeps it for every stage (the reference code's heuristics draw once);
without the suffix the choice is made afresh at every stage.
`dynamic` (DAPO / verl dynamic sampling) hands the whole pool to the stage:
it filters at every training step instead (`curriculum/sampling.py`).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from cropi.seeding import stream_seed


def selection_size(pool: int, select_ratio: float) -> int:
    """How many prompts a stage keeps of a pool of `pool` (at least one when the pool has any)."""
    return math.ceil(select_ratio * pool)


@dataclass
class SelectionContext:
    stage: int
    prompt_ids: list[str]  # the pool, in a fixed order
    select_ratio: float
    seed: int
    pass_rates: np.ndarray | None = None  # offline pass rate per pool prompt
    eligible: np.ndarray | None = None  # mixed offline rewards (POPI gradient exists)
    scores: dict[str, np.ndarray] | None = None  # validation set -> cosine per pool prompt

    @property
    def k(self) -> int:
        return selection_size(len(self.prompt_ids), self.select_ratio)


@dataclass
class Selection:
    prompt_ids: list[str]
    scores: list[float] = field(default_factory=list)  # the selector's own score, aligned with prompt_ids
    eligible: int = 0  # how many pool prompts could be chosen
    note: str = ""
    seconds: float = 0.0  # compute time of this selection (influence scoring included)

    @classmethod
    def from_json(cls, data: dict) -> Selection:
        return cls(list(data["prompt_ids"]), list(data["scores"]), int(data["eligible"]), data.get("note", ""),
                   float(data.get("seconds", 0.0)))

    def to_json(self) -> dict:
        return {"prompt_ids": self.prompt_ids, "scores": self.scores, "eligible": self.eligible,
                "selected": len(self.prompt_ids), "note": self.note, "seconds": self.seconds}


def _rng(ctx: SelectionContext, name: str) -> random.Random:
    return random.Random(stream_seed("select", name, ctx.seed, ctx.stage))


def select_full(ctx: SelectionContext) -> Selection:
    return Selection(list(ctx.prompt_ids), eligible=len(ctx.prompt_ids), note="whole pool")


def select_random(ctx: SelectionContext) -> Selection:
    idx = sorted(_rng(ctx, "random").sample(range(len(ctx.prompt_ids)), ctx.k))
    return Selection([ctx.prompt_ids[i] for i in idx], eligible=len(ctx.prompt_ids))


def select_learnability(ctx: SelectionContext) -> Selection:
    """Top K by p(1-p) of the offline pass rate; ties broken by a seeded shuffle."""
    p = _need(ctx.pass_rates, "learnability", "offline pass rates")
    value = p * (1 - p)
    order = list(range(len(p)))
    _rng(ctx, "learnability").shuffle(order)
    order.sort(key=lambda i: -value[i])
    chosen = order[: ctx.k]
    return Selection([ctx.prompt_ids[i] for i in chosen], [float(value[i]) for i in chosen],
                     eligible=int((value > 0).sum()))


def select_pass_rate(ctx: SelectionContext) -> Selection:
    """Uniform among prompts with 0 < p < 1."""
    p = _need(ctx.pass_rates, "pass_rate", "offline pass rates")
    pool = [i for i in range(len(p)) if 0 < p[i] < 1]
    k = min(ctx.k, len(pool))
    chosen = sorted(_rng(ctx, "pass_rate").sample(pool, k))
    note = "" if k == ctx.k else f"only {len(pool)} prompts with 0 < p < 1; kept all of them"
    return Selection([ctx.prompt_ids[i] for i in chosen], [float(p[i]) for i in chosen], eligible=len(pool),
                     note=note)


def reciprocal_rank_fusion(scores: dict[str, np.ndarray], eligible: np.ndarray, k: int) -> list[tuple[int, float]]:
    """Per validation set, the top-k eligible prompts; fused by sum of 1/rank; top k overall.

    Ties (equal fused score) break by pool order, which keeps the result a
    pure function of the scores.
    """
    fused: dict[int, float] = {}
    candidates = np.flatnonzero(eligible)
    for name in sorted(scores):
        s = scores[name]
        # Stable sort on -score: equal scores keep pool order.
        ranked = candidates[np.argsort(-s[candidates], kind="stable")][:k]
        for rank, i in enumerate(ranked, start=1):
            fused[int(i)] = fused.get(int(i), 0.0) + 1.0 / rank
    ordered = sorted(fused.items(), key=lambda item: (-item[1], item[0]))
    return ordered[:k]


def select_cropi(ctx: SelectionContext) -> Selection:
    scores = _need(ctx.scores, "cropi", "influence scores")
    eligible = _need(ctx.eligible, "cropi", "eligibility")
    n_eligible = int(eligible.sum())
    chosen = reciprocal_rank_fusion(scores, eligible, ctx.k)
    note = "" if n_eligible >= ctx.k else f"only {n_eligible} eligible prompts (< K={ctx.k}); kept all of them"
    return Selection([ctx.prompt_ids[i] for i, _ in chosen], [s for _, s in chosen], eligible=n_eligible,
                     note=note)


def _need(value, selector: str, what: str):
    if value is None:
        raise ValueError(f"selector {selector!r} needs {what}")
    return value


SELECTORS: dict[str, Callable[[SelectionContext], Selection]] = {
    "cropi": select_cropi,
    "full": select_full,
    "random": select_random,
    "learnability": select_learnability,
    "pass_rate": select_pass_rate,
    "dynamic": select_full,
}
# The loop calls these at stage 0 only and keeps the result for later stages.
KEEP_FIRST = {"influence_once": "cropi", "learnability_once": "learnability", "pass_rate_once": "pass_rate"}
NEEDS_INFLUENCE = {"cropi", "influence_once"}
NEEDS_PASS_RATES = {"learnability", "pass_rate", "learnability_once", "pass_rate_once"}


def selector_function(name: str) -> Callable[[SelectionContext], Selection]:
    """The function that makes `name`'s choice (for a `_once` selector: its stage-0 choice)."""
    return SELECTORS[KEEP_FIRST.get(name, name)]
