"""The arithmetic of the acceleration benchmark, as pure functions.

Curves are lists of (step, value), evaluated at the same steps for every
seed. Every statistic is computed on the *seed-mean* curve, never on one
seed's noisy point:

steps_to_target(curve, y)  the first step at which the curve reaches y,
                           linearly interpolated between the two evaluations
                           that bracket the crossing (None: never reached)
acceleration(full, s)      steps_to_target(full) / steps_to_target(s)
gain_area(curve, base, T)  area between the curve and the base level over
                           steps [0, T], divided by T (mean gain over the
                           budget); the ratio of two such areas is the
                           "ratio of areas under the curve"

Intervals come from a paired-seed bootstrap: resample the seed indices with
replacement, the *same* indices for every selector (the seeds are paired:
same pool, sets and rollout seeds), recompute the statistic on the
resampled seed means, and report the 5th and 95th percentiles (90 %).
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Callable, Sequence

Curve = Sequence[tuple[float, float]]


def mean_curve(curves: Sequence[Curve]) -> list[tuple[float, float]]:
    """Seed-mean curve; every seed must have been evaluated at the same steps."""
    if not curves:
        raise ValueError("no curves to average")
    steps = [s for s, _ in curves[0]]
    for c in curves[1:]:
        if [s for s, _ in c] != steps:
            raise ValueError("seeds were evaluated at different steps; cannot average their curves")
    return [(step, statistics.fmean(c[i][1] for c in curves)) for i, step in enumerate(steps)]


def steps_to_target(curve: Curve, target: float) -> float | None:
    """First (interpolated) step at which `curve` reaches `target`; None if it never does."""
    previous: tuple[float, float] | None = None
    for step, value in curve:
        if value >= target:
            if previous is None or previous[1] >= target:
                return float(step)
            (s0, v0), (s1, v1) = previous, (step, value)
            return s0 + (target - v0) * (s1 - s0) / (v1 - v0)
        previous = (step, value)
    return None


def acceleration(full_steps: float | None, selector_steps: float | None) -> float | None:
    """steps_to_target(full) / steps_to_target(selector); None when either never reaches it.

    A selector on target at step 0 (before training) would divide by zero;
    it is None too, since nothing was accelerated.
    """
    if full_steps is None or selector_steps is None or selector_steps == 0:
        return None
    return full_steps / selector_steps


def value_at(curve: Curve, step: float) -> float:
    """The curve linearly interpolated at `step` (clamped to its ends)."""
    points = list(curve)
    if step <= points[0][0]:
        return points[0][1]
    for (s0, v0), (s1, v1) in zip(points, points[1:]):
        if s0 <= step <= s1:
            return v0 + (v1 - v0) * (step - s0) / (s1 - s0) if s1 > s0 else v1
    return points[-1][1]


def gain_area(curve: Curve, base: float, horizon: float) -> float:
    """Mean of (curve - base) over steps [0, horizon], by the trapezoid rule on the interpolated curve."""
    if horizon <= 0:
        raise ValueError("the horizon of an area must be positive")
    points = [(s, v) for s, v in curve if s < horizon] + [(horizon, value_at(curve, horizon))]
    area = sum((s1 - s0) * ((v0 + v1) / 2 - base) for (s0, v0), (s1, v1) in zip(points, points[1:]))
    return area / horizon


def gain_level(base: float, final: float, fraction: float) -> float:
    """The accuracy at `fraction` of the way from `base` to `final`."""
    return base + fraction * (final - base)


def paired_bootstrap(n_seeds: int, statistic: Callable[[list[int]], float | None], resamples: int = 2000,
                     seed: int = 0, level: float = 0.90) -> tuple[float, float] | None:
    """Percentile interval of `statistic(seed indices)` over paired resamples of the seeds.

    `statistic` gets a list of `n_seeds` indices drawn with replacement and
    returns a number, +/-inf (e.g. a target never reached), or None (not
    defined for this resample: left out). None when no resample is defined.
    """
    rng = random.Random(seed)
    values = []
    for _ in range(resamples):
        value = statistic([rng.randrange(n_seeds) for _ in range(n_seeds)])
        if value is not None and not math.isnan(value):
            values.append(value)
    if not values:
        return None
    values.sort()
    tail = (1 - level) / 2
    return percentile(values, tail), percentile(values, 1 - tail)


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default) of already sorted values."""
    if not sorted_values:
        raise ValueError("no values")
    pos = q * (len(sorted_values) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    a, b = sorted_values[lo], sorted_values[hi]
    if lo == hi or a == b:
        return a
    return a + (b - a) * (pos - lo)
