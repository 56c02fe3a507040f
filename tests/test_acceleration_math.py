"""The acceleration arithmetic, checked against values computed by hand."""

import math

import pytest

from cropi.bench.acceleration_math import (
    acceleration,
    gain_area,
    gain_level,
    mean_curve,
    paired_bootstrap,
    percentile,
    steps_to_target,
    value_at,
)


def test_mean_curve_averages_seeds_pointwise():
    assert mean_curve([[(0, 0.1), (10, 0.3)], [(0, 0.3), (10, 0.5)]]) == [(0, pytest.approx(0.2)),
                                                                          (10, pytest.approx(0.4))]


def test_seeds_evaluated_at_different_steps_cannot_be_averaged():
    with pytest.raises(ValueError, match="different steps"):
        mean_curve([[(0, 0.1), (10, 0.3)], [(0, 0.1), (20, 0.3)]])


def test_steps_to_target_interpolates_between_the_evaluations_that_bracket_the_crossing():
    curve = [(0, 0.1), (10, 0.25), (20, 0.2), (30, 0.4)]
    # 0.2 lies 2/3 of the way from 0.1 (step 0) to 0.25 (step 10).
    assert steps_to_target(curve, 0.2) == pytest.approx(20 / 3)
    assert steps_to_target(curve, 0.25) == pytest.approx(10.0)
    # The first crossing of 0.3 is between step 20 (0.2) and step 30 (0.4): half way.
    assert steps_to_target(curve, 0.3) == pytest.approx(25.0)
    assert steps_to_target(curve, 0.5) is None


def test_a_curve_on_target_at_its_first_evaluation_reaches_it_there():
    assert steps_to_target([(0, 0.5), (10, 0.6)], 0.4) == 0.0


def test_acceleration_is_the_ratio_of_interpolated_steps_to_target():
    full = [(0, 0.1), (40, 0.2), (80, 0.3)]
    cropi = [(0, 0.1), (20, 0.25), (30, 0.35)]
    # full reaches 0.3 at step 80; cropi at 20 + 10 * (0.3 - 0.25) / 0.1 = 25.
    assert acceleration(steps_to_target(full, 0.3), steps_to_target(cropi, 0.3)) == pytest.approx(80 / 25)
    assert acceleration(80, None) is None and acceleration(None, 30) is None and acceleration(80, 0) is None


def test_value_at_interpolates_and_clamps():
    curve = [(0, 0.0), (10, 1.0), (20, 0.5)]
    assert value_at(curve, 5) == pytest.approx(0.5)
    assert value_at(curve, 15) == pytest.approx(0.75)
    assert value_at(curve, 30) == 0.5 and value_at(curve, -1) == 0.0


def test_gain_area_is_the_mean_gain_over_the_budget():
    curve = [(0, 0.2), (10, 0.4), (20, 0.4), (30, 1.0)]
    # Trapezoids above 0.2 over [0, 20]: 10 * 0.1 + 10 * 0.2 = 3.0 -> mean 0.15.
    assert gain_area(curve, 0.2, 20) == pytest.approx(0.15)
    # A horizon between evaluations cuts the last trapezoid at the interpolated value (0.7 at 25):
    # 3.0 + 5 * ((0.4 + 0.7) / 2 - 0.2) = 4.75 over 25 steps.
    assert gain_area(curve, 0.2, 25) == pytest.approx(4.75 / 25)
    with pytest.raises(ValueError):
        gain_area(curve, 0.2, 0)


def test_gain_level_is_a_fraction_of_the_way_from_base_to_final():
    assert gain_level(0.2, 0.8, 0.75) == pytest.approx(0.65)


def test_percentile_matches_linear_interpolation():
    values = [1.0, 2.0, 3.0, 4.0, 5.0]
    assert percentile(values, 0.05) == pytest.approx(1.2)
    assert percentile(values, 0.95) == pytest.approx(4.8)
    assert percentile([1.0, math.inf], 0.95) == math.inf


def test_paired_bootstrap_of_a_constant_is_that_constant():
    assert paired_bootstrap(5, lambda idx: 0.7, resamples=50) == (0.7, 0.7)


def test_paired_bootstrap_resamples_seed_indices_with_replacement():
    # Two seeds with values 0 and 1: a resample's mean is 0, 0.5 or 1 with probability 1/4, 1/2, 1/4,
    # so the 5th percentile is 0 and the 95th is 1.
    seen = []

    def mean_of(idx):
        seen.append(tuple(idx))
        return sum((0.0, 1.0)[i] for i in idx) / len(idx)

    lo, hi = paired_bootstrap(2, mean_of, resamples=400, seed=1)
    assert (lo, hi) == (0.0, 1.0)
    assert set(seen) == {(0, 0), (0, 1), (1, 0), (1, 1)}
    # Seeded: the same resamples again.
    assert paired_bootstrap(2, mean_of, resamples=400, seed=1) == (lo, hi)


def test_paired_bootstrap_pairs_selectors_by_seed():
    # Selector b is always a + 0.1 on the same seed, although the seeds differ widely:
    # the paired difference has no spread at all.
    a = [0.1, 0.5, 0.9, 0.3]
    b = [x + 0.1 for x in a]

    def diff(idx):
        return sum(b[i] for i in idx) / len(idx) - sum(a[i] for i in idx) / len(idx)

    lo, hi = paired_bootstrap(4, diff, resamples=200)
    assert lo == pytest.approx(0.1) and hi == pytest.approx(0.1)


def test_paired_bootstrap_leaves_out_undefined_resamples():
    assert paired_bootstrap(3, lambda idx: None, resamples=20) is None
    lo, hi = paired_bootstrap(2, lambda idx: None if idx[0] == 0 else 2.0, resamples=100)
    assert (lo, hi) == (2.0, 2.0)
