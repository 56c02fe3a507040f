"""Validation targets and influence scores (docs/design.md §2.4-2.5).

t_j    = mean of z(y) over up to `max_valid_prompts` eligible prompts of
         validation set j (a seeded choice among those with mixed offline rewards)
s_j(x) = cos(z(x), t_j)

Ineligible prompts (all-equal offline rewards, hence no gradient) score -inf
so that no selector can pick them by accident.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np

from cropi.seeding import stream_seed
from cropi.influence.popi import ProjectedGradients


def choose_target_prompts(prompt_ids: Sequence[str], max_prompts: int, seed: int, set_name: str) -> list[str]:
    """The seeded subset of a validation set's eligible prompts whose gradients define its target."""
    ids = list(prompt_ids)
    if len(ids) <= max_prompts:
        return ids
    rng = random.Random(stream_seed("target", seed, set_name))
    return sorted(rng.sample(ids, max_prompts))


def target_vector(grads: ProjectedGradients) -> np.ndarray:
    """Mean projected gradient of the target prompts (all eligible, so no zero rows)."""
    return grads.vectors.mean(axis=0) if len(grads.prompt_ids) else np.zeros(0, np.float32)


def cosine_scores(grads: ProjectedGradients, target: np.ndarray) -> np.ndarray:
    t_norm = float(np.linalg.norm(target))
    scores = np.full(len(grads.prompt_ids), -np.inf, dtype=np.float64)
    if t_norm == 0:
        return scores  # a validation set with no learnable prompt gives no direction
    ok = grads.eligible & (grads.norms > 0)
    scores[ok] = (grads.vectors[ok].astype(np.float64) @ target.astype(np.float64)) / (
        grads.norms[ok].astype(np.float64) * t_norm
    )
    return scores
