"""The policy being trained and the stage loop that trains it.

Shared by the embedded run (`runner.py`) and the trainer service, so that
both take the same steps on the same batches with the same seeds: batches,
rollout seeds and evaluation seeds are pure functions of (spec, stage, step).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from cropi.curriculum.sampler import EpochSampler
from cropi.curriculum.selectors import Selection
from cropi.curriculum.state import Progress
from cropi.data.arith import stream_seed
from cropi.data.sources import JobData
from cropi.data.types import Prompt
from cropi.data.verifiers import reward
from cropi.evaluation import evaluate, targeted_mean
from cropi.models.loading import load_policy
from cropi.rl.trainer import GRPOTrainer
from cropi.rollout.base import RolloutEngine, SamplingParams, Trajectory
from cropi.rollout.hf import HFRolloutEngine
from cropi.spec import JobSpec

Log = Callable[..., None]  # log(kind, step, **values)


class Policy:
    """Model + frozen reference + rollout engine + GRPO trainer for one job."""

    def __init__(self, spec: JobSpec, build_progress: Callable | None = None):
        self.spec = spec
        torch.manual_seed(spec.seed)
        self.model, self.tokenizer = load_policy(spec.model.path, spec.model.dtype, build_progress)
        ref = copy.deepcopy(self.model) if spec.rl.kl_coef > 0 else None
        self.engine = HFRolloutEngine(self.model, self.tokenizer, spec.rollout.batch_size)
        self.trainer = GRPOTrainer(self.model, ref, self.tokenizer.pad_token_id, spec.rl, spec.rollout.temperature)

    def base_model(self) -> torch.nn.Module:
        """The model the job started from (the KL reference when there is one; else loaded once)."""
        if self.trainer.ref_model is None:
            self.trainer.ref_model = load_policy(self.spec.model.path, self.spec.model.dtype)[0]
            self.trainer.ref_model.eval().requires_grad_(False)
        return self.trainer.ref_model

    # ----------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.trainer.optimizer.state_dict(),
                "scheduler": self.trainer.scheduler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.trainer.optimizer.load_state_dict(state["optimizer"])
        self.trainer.scheduler.load_state_dict(state["scheduler"])

    # ----------------------------------------------------------- work
    def evaluate(self, data: JobData, step: int, log: Log) -> dict[str, dict[str, float]]:
        return evaluate_policy(self.spec, self.engine, data, step, log)

    def train_step(self, step: int, draw: Draw) -> dict[str, float]:
        t0 = time.perf_counter()
        groups, rewards, draws = sample_step(self.spec, self.engine, step, draw)
        t1 = time.perf_counter()
        stats = self.trainer.step(groups, rewards)
        stats.update(rollout_s=t1 - t0, train_s=time.perf_counter() - t1, draws=draws)
        return stats


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


def stage_prompts(data: JobData, selection: Selection) -> list[Prompt]:
    by_id = {p.id: p for p in data.pool}
    return [by_id[i] for i in selection.prompt_ids]


def train_stage(policy: Policy, data: JobData, progress: Progress, selection: Selection, log: Log,
                save: Callable[[Progress], None], on_step: Callable[[dict], None] | None = None) -> None:
    """Run the remaining steps of stage `progress.stage`, saving after each completed step."""
    spec, cur, stage = policy.spec, policy.spec.curriculum, progress.stage
    prompts = stage_prompts(data, selection)
    if not prompts:
        return
    sampler = EpochSampler(prompts, spec.rl.batch_prompts, seed=f"{spec.seed}-stage{stage}")
    # Each step owns a fixed range of the sampler's batches, so that a resumed
    # run draws the same ones whatever an earlier step consumed.
    per_step = draws_per_step(spec)
    while progress.step_in_stage < cur.steps_per_stage:
        i, step = progress.step_in_stage, progress.step + 1
        stats = policy.train_step(step, lambda d, i=i: sampler.batch(i * per_step + d))
        log("train", step, stage=stage, **stats)
        if step % spec.eval.every == 0 or i == cur.steps_per_stage - 1:
            progress.after = policy.evaluate(data, step, log)
        progress.step, progress.step_in_stage = step, i + 1
        save(progress)
        if on_step:
            on_step(stats)


def finish_stage(policy: Policy, data: JobData, progress: Progress, selection: Selection) -> None:
    """Record the stage's summary and move `progress` to the next stage (the caller saves it)."""
    cur, stage = policy.spec.curriculum, progress.stage
    selected = len(selection.prompt_ids)
    progress.stages.append({
        "stage": stage, "selected": selected, "eligible": selection.eligible,
        "note": selection.note or ("" if selected else "skipped: nothing eligible"),
        "before": progress.stage_before, "after": progress.after, "end_step": progress.step,
    })
    if cur.reset_optimizer:
        policy.trainer.reset_optimizer()
    if cur.target_accuracy is not None and targeted_mean(progress.after, list(data.validation)) >= cur.target_accuracy:
        progress.stopped_early = True
    progress.stage, progress.step_in_stage, progress.stage_before = stage + 1, 0, progress.after
