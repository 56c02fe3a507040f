"""The paper's step-acceleration definition, checked by hand."""

import pytest

from cropi.bench.acceleration_math import acceleration, mean_curve, steps_to_target


def test_mean_curve_averages_seeds_pointwise():
    assert mean_curve([[(0, 0.1), (10, 0.3)], [(0, 0.3), (10, 0.5)]]) == [(0, pytest.approx(0.2)),
                                                                          (10, pytest.approx(0.4))]


def test_seeds_evaluated_at_different_steps_cannot_be_averaged():
    with pytest.raises(ValueError, match="different steps"):
        mean_curve([[(0, 0.1), (10, 0.3)], [(0, 0.1), (20, 0.3)]])


def test_steps_to_target_is_the_first_evaluated_step_at_or_above_it():
    curve = [(0, 0.1), (10, 0.25), (20, 0.2), (30, 0.4)]
    assert steps_to_target(curve, 0.25) == 10
    assert steps_to_target(curve, 0.3) == 30
    assert steps_to_target(curve, 0.5) is None


def test_acceleration_is_the_ratio_of_steps_to_target():
    full = [(0, 0.1), (40, 0.2), (80, 0.3)]
    cropi = [(0, 0.1), (20, 0.25), (30, 0.31)]
    target = full[-1][1]
    assert acceleration(steps_to_target(full, target), steps_to_target(cropi, target)) == pytest.approx(80 / 30)
    assert acceleration(80, None) is None and acceleration(None, 30) is None and acceleration(80, 0) is None
