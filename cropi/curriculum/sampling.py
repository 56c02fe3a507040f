"""What a training step samples and how a policy is evaluated.

Batches, rollout seeds and evaluation seeds are pure functions of (spec,
stage, step), so every executor (inline, Ray) takes the same steps on the
same batches, and a resumed run draws what an uninterrupted one would.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from cropi.data.rewards import reward
from cropi.data.sources import JobData
from cropi.data.types import Prompt
from cropi.evaluation import evaluate, targeted_mean
from cropi.rollout.base import RolloutEngine, SamplingParams, Trajectory
from cropi.seeding import stream_seed
from cropi.spec import JobSpec

Log = Callable[..., None]  # log(kind, step, **values)


class EpochSampler:
    """Yields `batch_size` prompts at a time, reshuffling at every epoch.

    The order is a pure function of (seed, epoch), so a resumed run that
    skips the first `k` batches sees the same batches as an uninterrupted one.
    """

    def __init__(self, prompts: Sequence[Prompt], batch_size: int, seed: int | str):
        if not prompts:
            raise ValueError("cannot sample batches from an empty prompt set")
        self.prompts = list(prompts)
        self.batch_size = batch_size
        self.seed = seed

    def batch(self, index: int) -> list[Prompt]:
        """The `index`-th batch (0-based) of the infinite shuffled stream."""
        n = len(self.prompts)
        out: list[Prompt] = []
        pos = index * self.batch_size
        while len(out) < self.batch_size:
            epoch, offset = divmod(pos, n)
            order = list(range(n))
            random.Random(stream_seed("epoch", self.seed, epoch)).shuffle(order)
            take = min(self.batch_size - len(out), n - offset)
            out.extend(self.prompts[i] for i in order[offset : offset + take])
            pos += take
        return out


Groups = list[list[Trajectory]]
Rewards = list[list[float]]
Draw = Callable[[int], Sequence[Prompt]]  # draw(i): the i-th prompt batch offered to a training step


def sample_groups(spec: JobSpec, engine: RolloutEngine, step: int, prompts: Sequence[Prompt],
                  draw_index: int = 0) -> tuple[Groups, Rewards]:
    """Rollouts of one prompt batch of step `step` and their rewards (seeded by step: any engine, same draws)."""
    r = spec.rollout
    parts = ("rollout", spec.seed, step) + ((draw_index,) if draw_index else ())
    sampling = SamplingParams(
        temperature=r.temperature, top_p=r.top_p, max_new_tokens=r.max_new_tokens,
        seed=stream_seed(*parts) % 2**63,
    )
    groups = engine.generate([p.text for p in prompts], r.n, sampling)
    return groups, [[reward(p, t.text) for t in g] for p, g in zip(prompts, groups)]


SAMPLES_PER_STEP = 2  # decoded responses a training step keeps in its records, for people to read


def sample_texts(groups: Groups, rewards: Rewards, k: int = SAMPLES_PER_STEP) -> list[dict]:
    """The first response of the first `k` groups, decoded, with its reward."""
    return [{"response": g[0].text, "reward": r[0]} for g, r in zip(groups[:k], rewards[:k])]


def mixed_groups(groups: Groups, rewards: Rewards) -> tuple[Groups, Rewards]:
    """The groups whose rewards are not all equal: the only ones with a GRPO advantage."""
    kept = [(g, r) for g, r in zip(groups, rewards) if len(set(r)) > 1]
    return [g for g, _ in kept], [r for _, r in kept]


def draws_per_step(spec: JobSpec) -> int:
    """Prompt batches a training step may sample: more than one only for dynamic sampling."""
    return spec.curriculum.dynamic_max_draws if spec.curriculum.selector == "dynamic" else 1


def sample_step(spec: JobSpec, engine: RolloutEngine, step: int, draw: Draw) -> tuple[Groups, Rewards, int]:
    """The rollouts a training step trains on, and how many prompt batches it sampled.

    Every selector but `dynamic` samples one batch. `dynamic` is DAPO's
    dynamic sampling (verl's `filter_groups`): drop the groups whose rewards
    are all equal, sample further batches until `batch_prompts` groups are
    kept or `dynamic_max_draws` batches were sampled, train on the first
    `batch_prompts` kept. The extra rollouts are part of the step's
    rollout time. If no group of any batch is mixed, the last batch is
    trained on as it is (zero advantages: only the KL and entropy terms act).
    """
    if spec.curriculum.selector != "dynamic":
        return (*sample_groups(spec, engine, step, draw(0)), 1)
    want = spec.rl.batch_prompts
    kept_groups: Groups = []
    kept_rewards: Rewards = []
    for index in range(draws_per_step(spec)):
        groups, rewards = sample_groups(spec, engine, step, draw(index), index)
        mixed = mixed_groups(groups, rewards)
        kept_groups += mixed[0]
        kept_rewards += mixed[1]
        if len(kept_groups) >= want:
            break
    if not kept_groups:
        return groups, rewards, index + 1
    return kept_groups[:want], kept_rewards[:want], index + 1


def evaluate_policy(spec: JobSpec, engine: RolloutEngine, data: JobData, step: int,
                    log: Log) -> dict[str, dict[str, float]]:
    """Accuracy on every evaluation set at `step`, logged per set and as the targeted summary."""
    ev = spec.eval
    results = evaluate(
        engine, data.eval_sets, ev.max_new_tokens or spec.rollout.max_new_tokens, samples=ev.samples,
        temperature=ev.temperature or spec.rollout.temperature,
        seed=stream_seed("eval", spec.seed, step) % 2**63,
    )
    for name, metrics in results.items():
        log("eval", step, set=name, targeted=name in data.validation, **metrics)
    targeted = list(data.validation)
    if targeted:
        metrics = results[targeted[0]]
        log("eval_summary", step, **{f"targeted_{m}": targeted_mean(results, targeted, m) for m in metrics})
    return results
