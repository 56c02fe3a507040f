"""Evaluation on named prompt sets.

Per set: `accuracy` — greedy decoding, the headline metric — and, with
`samples` > 0, `sampled_accuracy` — the mean reward of `samples` responses
per prompt at the rollout temperature (avg@k, as RLVR papers report) — and
`pass_at_k` — the share of prompts with at least one right answer among
them (pass@k, k = `samples`): the latent capability RL can sharpen into
greedy accuracy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from cropi.data.types import Prompt
from cropi.data.rewards import reward
from cropi.rollout.base import RolloutEngine, SamplingParams


def targeted_mean(results: Mapping[str, Mapping[str, float]], targeted: Sequence[str],
                  metric: str = "accuracy") -> float:
    """Mean of `metric` over the targeted sets (NaN where a set lacks the metric)."""
    return sum(results[n].get(metric, float("nan")) for n in targeted) / max(1, len(targeted))


def evaluate(
    engine: RolloutEngine,
    sets: Mapping[str, Sequence[Prompt]],
    max_new_tokens: int,
    samples: int = 0,
    temperature: float = 1.0,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    greedy = SamplingParams(greedy=True, max_new_tokens=max_new_tokens)
    sampled = SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens, seed=seed)
    results: dict[str, dict[str, float]] = {}
    for name, prompts in sets.items():
        texts = [p.text for p in prompts]
        groups = engine.generate(texts, 1, greedy)
        hits = [reward(p, g[0].text) for p, g in zip(prompts, groups)]
        results[name] = {"accuracy": sum(hits) / max(1, len(hits))}
        if samples > 0:
            groups = engine.generate(texts, samples, sampled)
            per_prompt = [[reward(p, t.text) for t in g] for p, g in zip(prompts, groups)]
            n = max(1, len(per_prompt))
            results[name]["sampled_accuracy"] = sum(sum(r) / samples for r in per_prompt) / n
            results[name]["pass_at_k"] = sum(max(r) > 0 for r in per_prompt) / n
    return results
