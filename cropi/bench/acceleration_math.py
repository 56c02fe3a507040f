"""The acceleration arithmetic of the paper, as pure functions (issue B2).

target             = final targeted accuracy of `full`, mean over seeds
steps_to_target(s) = first evaluated step at which selector s's seed-mean
                     curve reaches the target (None if never)
acceleration(s)    = steps_to_target(full) / steps_to_target(s)

Curves are lists of (step, value) evaluated at the same steps for every seed.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

Curve = Sequence[tuple[int, float]]


def mean_curve(curves: Sequence[Curve]) -> list[tuple[int, float]]:
    """Seed-mean curve; every seed must have been evaluated at the same steps."""
    if not curves:
        raise ValueError("no curves to average")
    steps = [s for s, _ in curves[0]]
    for c in curves[1:]:
        if [s for s, _ in c] != steps:
            raise ValueError("seeds were evaluated at different steps; cannot average their curves")
    return [(step, statistics.fmean(c[i][1] for c in curves)) for i, step in enumerate(steps)]


def steps_to_target(curve: Curve, target: float) -> int | None:
    for step, value in curve:
        if value >= target:
            return step
    return None


def acceleration(full_steps: int | None, selector_steps: int | None) -> float | None:
    """steps_to_target(full) / steps_to_target(selector); None when either never reaches it.

    A selector that is on target at step 0 (before training) would divide by
    zero; it is reported as None too, since nothing was accelerated.
    """
    if full_steps is None or selector_steps is None or selector_steps == 0:
        return None
    return full_steps / selector_steps
