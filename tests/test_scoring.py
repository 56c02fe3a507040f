"""Projected-gradient storage and cosine scoring."""

import numpy as np

from cropi.curriculum.layout import grads_key
from cropi.influence.gradstore import load_projected, save_projected
from cropi.influence.popi import ProjectedGradients
from cropi.influence.scoring import choose_target_prompts, cosine_scores, target_vector
from cropi.runtime.store import LocalStore


def grads(vectors, eligible=None):
    vectors = np.asarray(vectors, dtype=np.float32)
    eligible = np.ones(len(vectors), bool) if eligible is None else np.asarray(eligible)
    return ProjectedGradients([f"{i}" for i in range(len(vectors))], vectors,
                              np.linalg.norm(vectors, axis=1), eligible)


def test_stored_gradients_round_trip_within_fp16_unit_precision(tmp_path):
    store = LocalStore(tmp_path)
    rng = np.random.default_rng(0)
    g = grads(rng.standard_normal((5, 256)) * np.array([[1e-6], [1e-2], [1], [1e3], [1e6]]),
              eligible=[True, True, True, True, False])
    key = grads_key("job", 0, "pool", 0)
    save_projected(store, key, g, {"kind": "test"})
    back = load_projected(store, key)
    assert back.prompt_ids == g.prompt_ids and list(back.eligible) == list(g.eligible)
    # Directions survive whatever the magnitude (raw fp16 would flush 1e-6 to 0 and overflow 1e6).
    cos = (back.vectors * g.vectors).sum(1) / (np.linalg.norm(back.vectors, axis=1) * g.norms)
    assert np.all(cos > 0.9999)
    assert np.allclose(back.norms, g.norms, rtol=1e-6)


def test_cosine_scores_and_ineligible_prompts():
    g = grads([[1, 0], [0, 1], [1, 1], [5, 0]], eligible=[True, True, True, False])
    s = cosine_scores(g, np.array([2.0, 0.0]))
    assert s[0] == 1.0 and s[1] == 0.0 and np.isclose(s[2], 2**-0.5)
    assert s[3] == -np.inf


def test_zero_target_gives_no_direction():
    assert np.all(cosine_scores(grads([[1, 0]]), np.zeros(2)) == -np.inf)


def test_target_is_the_mean_and_target_prompts_are_a_seeded_subset():
    assert np.allclose(target_vector(grads([[1, 0], [0, 1]])), [0.5, 0.5])
    ids = [f"{i:03d}" for i in range(500)]
    a = choose_target_prompts(ids, 100, seed=0, set_name="v")
    assert a == choose_target_prompts(ids, 100, seed=0, set_name="v") and len(set(a)) == 100
    assert a != choose_target_prompts(ids, 100, seed=1, set_name="v")
    assert choose_target_prompts(ids[:50], 100, 0, "v") == ids[:50]
