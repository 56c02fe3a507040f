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

    def train_step(self, step: int, prompts: Sequence[Prompt]) -> dict[str, float]:
        t0 = time.perf_counter()
        groups, rewards = sample_groups(self.spec, self.engine, step, prompts)
        t1 = time.perf_counter()
        stats = self.trainer.step(groups, rewards)
        stats.update(rollout_s=t1 - t0, train_s=time.perf_counter() - t1)
        return stats


def sample_groups(spec: JobSpec, engine: RolloutEngine, step: int,
                  prompts: Sequence[Prompt]) -> tuple[list[list[Trajectory]], list[list[float]]]:
    """The rollouts of training step `step` and their rewards (seeded by step: any engine, same draws)."""
    r = spec.rollout
    sampling = SamplingParams(
        temperature=r.temperature, top_p=r.top_p, max_new_tokens=r.max_new_tokens,
        seed=stream_seed("rollout", spec.seed, step) % 2**63,
    )
    groups = engine.generate([p.text for p in prompts], r.n, sampling)
    return groups, [[reward(p, t.text) for t in g] for p, g in zip(prompts, groups)]


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
    while progress.step_in_stage < cur.steps_per_stage:
        i, step = progress.step_in_stage, progress.step + 1
        stats = policy.train_step(step, sampler.batch(i))
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
