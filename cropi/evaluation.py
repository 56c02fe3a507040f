"""Greedy evaluation: accuracy of the policy on named prompt sets."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from cropi.data.types import Prompt
from cropi.data.verifiers import reward
from cropi.rollout.base import RolloutEngine, SamplingParams


def evaluate(
    engine: RolloutEngine, sets: Mapping[str, Sequence[Prompt]], max_new_tokens: int
) -> dict[str, float]:
    """Greedy-decoding accuracy per set (the fraction of prompts rewarded 1)."""
    greedy = SamplingParams(greedy=True, max_new_tokens=max_new_tokens)
    results = {}
    for name, prompts in sets.items():
        groups = engine.generate([p.text for p in prompts], 1, greedy)
        hits = [reward(p, g[0].text) for p, g in zip(prompts, groups)]
        results[name] = sum(hits) / max(1, len(hits))
    return results
