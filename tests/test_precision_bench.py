"""`run_precision_bench` on a tiny configuration: structure, ranges, determinism."""

import numpy as np

from cropi.bench.precision import run_precision_bench, spearman
from tests.conftest import TEST_MODEL


def test_spearman_matches_hand_values():
    assert spearman(np.array([1.0, 2.0, 3.0]), np.array([10.0, 20.0, 30.0])) == 1.0
    assert spearman(np.array([1.0, 2.0, 3.0]), np.array([3.0, 2.0, 1.0])) == -1.0
    # ties get averaged ranks: [0, 1.5, 1.5] vs [0, 1, 2] -> 0.8660
    assert abs(spearman(np.array([1.0, 2.0, 2.0]), np.array([1.0, 2.0, 3.0])) - np.sqrt(3) / 2) < 1e-12


def test_precision_bench_tiny(mixed_rewards):
    kwargs = dict(model_path=TEST_MODEL, pool_size=60, valid_size=20, ratios=(0.1, 1.0),
                  dims=(256, 4096), seeds=1, dense_dims=())
    out = run_precision_bench(**kwargs)
    assert out["eligible_pool"] >= 2 and out["valid_prompts"] >= 1 and out["d"] > 0
    assert out["selected"] == -(-out["eligible_pool"] // 10)
    assert out["timing_s"] > 0
    grid = out["grid"]
    assert [(r["sparse_ratio"], r["proj_dim"]) for r in grid] == [(0.1, 256), (0.1, 4096), (1.0, 256), (1.0, 4096)]
    for row in grid:
        assert 0.0 <= row["precision_mean"] <= 1.0
        assert row["precision_std"] == 0.0  # one seed
        assert -1.0 <= row["spearman_mean"] <= 1.0
    rec = out["recommended"]
    best = max(r["precision_mean"] for r in grid)
    chosen = next(r for r in grid if (r["sparse_ratio"], r["proj_dim"]) == (rec["sparse_ratio"], rec["proj_dim"]))
    assert chosen["precision_mean"] >= best - 0.02
    options = {row["option"]: row for row in out["options"]}
    assert set(options) == {"params=last:1", "params=last:2", "params=lm_head.*", "candidates=0.25 of eligible",
                            "candidates=0.5 of eligible", "candidates=0.75 of eligible"}
    assert all(0.0 <= row["precision_mean"] <= 1.0 for row in out["options"])
    assert 0 < options["params=lm_head.*"]["parameter_share"] < options["params=last:1"]["parameter_share"] < 1
    again = run_precision_bench(**kwargs)
    assert again["grid"] == grid and again["recommended"] == rec and again["options"] == out["options"]
