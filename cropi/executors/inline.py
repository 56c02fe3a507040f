"""`executor: inline`: a job's tasks run in the worker's own process.

    offline  sample one part of the offline trajectories with the HF engine
    project  POPI-project one part at the stage-start policy
    train    run one stage's GRPO steps on a single-process `Policy`

`JobCache` is what a worker process keeps per job (spec, data, the policy
of the stage it last worked on); the Ray executor and the projection pool's
actors use it too. Stage checkpoints are consolidated HF folders in the
store (config + safetensors + tokenizer), one object per file.

A stored part a handler reads and finds unreadable (a flipped byte, a
truncated write) is recomputed, with a warning event naming its key:
`TaskRecompute` runs the handler of the part's own task for an influence
engine that cannot (the embedded run's controller has no model).
"""

from __future__ import annotations

import copy
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from cropi.curriculum import layout
from cropi.curriculum.influence import InfluenceEngine
from cropi.curriculum.sampling import Draw, Log, evaluate_policy, sample_step, sample_texts
from cropi.curriculum.stage import TrainerJournal, run_train_task
from cropi.data.access import data_access
from cropi.data.sources import JobData, load_job_data
from cropi.devices import resolve_device, resolve_dtype
from cropi.executors.report import StageReport
from cropi.models.loading import load_policy
from cropi.rl.trainer import GRPOTrainer
from cropi.rollout.hf import HFRolloutEngine
from cropi.runtime.hf_store import get_hf_folder, put_hf_folder
from cropi.runtime.jobs import JobRegistry
from cropi.runtime.store import ObjectStore
from cropi.runtime.tasks import ExecutorFor, OfflineTask, ProjectTask, TaskContext, TrainTask
from cropi.spec import JobSpec, parse_spec_yaml


class Policy:
    """Model + frozen reference + rollout engine + GRPO trainer for one job, in one process."""

    def __init__(self, spec: JobSpec, build_progress: Callable | None = None):
        self.spec = spec
        self.device = resolve_device(spec.device)
        self.dtype = resolve_dtype(spec.model.dtype, self.device)
        torch.manual_seed(spec.seed)
        self.model, self.tokenizer = load_policy(spec.model.path, self.dtype, build_progress)
        self.model.to(self.device)
        ref = copy.deepcopy(self.model) if spec.rl.kl_coef > 0 else None
        self.engine = HFRolloutEngine(self.model, self.tokenizer, spec.rollout.batch_size)
        self.trainer = GRPOTrainer(self.model, ref, self.tokenizer.pad_token_id, spec.rl, spec.rollout.temperature)

    def base_model(self) -> torch.nn.Module:
        """The model the job started from (the KL reference when there is one; else loaded once)."""
        if self.trainer.ref_model is None:
            self.trainer.ref_model = load_policy(self.spec.model.path, self.dtype)[0].to(self.device)
            self.trainer.ref_model.eval().requires_grad_(False)
        return self.trainer.ref_model

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.trainer.optimizer.state_dict(),
                "scheduler": self.trainer.scheduler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.trainer.optimizer.load_state_dict(state["optimizer"])
        self.trainer.scheduler.load_state_dict(state["scheduler"])

    def evaluate(self, data: JobData, step: int, log: Log) -> dict[str, dict[str, float]]:
        return evaluate_policy(self.spec, self.engine, data, step, log)

    def train_step(self, step: int, draw: Draw) -> dict[str, float]:
        t0 = time.perf_counter()
        groups, rewards, draws = sample_step(self.spec, self.engine, step, draw)
        t1 = time.perf_counter()
        stats = self.trainer.step(groups, rewards)
        stats.update(rollout_s=t1 - t0, train_s=time.perf_counter() - t1, draws=draws,
                     samples=sample_texts(groups, rewards))
        return stats

    def reset_optimizer(self) -> None:
        self.trainer.reset_optimizer()


def put_checkpoint(store: ObjectStore, prefix: str, policy: Policy) -> None:
    put_hf_folder(store, prefix, policy.model, policy.tokenizer)


def load_checkpoint_weights(store: ObjectStore, prefix: str, policy: Policy) -> None:
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        loaded = AutoModelForCausalLM.from_pretrained(get_hf_folder(store, prefix, Path(tmp)),
                                                      dtype=policy.model.dtype)
    policy.model.load_state_dict(loaded.state_dict())


class JobCache:
    """What a worker process keeps per job: spec, data, and one policy (reloaded when the stage changes)."""

    def __init__(self, store: ObjectStore):
        self.store = store
        self._specs: dict[str, JobSpec] = {}
        self._data: dict[str, JobData] = {}
        self._policy: tuple[str, int, Policy] | None = None  # (job, stage, policy at that stage's start)

    def spec(self, job: str) -> JobSpec:
        if job not in self._specs:
            key = layout.spec_key(job)
            self._specs[job] = parse_spec_yaml(self.store.get(key).decode(), key)
        return self._specs[job]

    def data(self, job: str) -> JobData:
        if job not in self._data:
            # This process's data policy; a service's Ray actor reads s3:// sources through this store.
            self._data[job] = load_job_data(self.spec(job), access=data_access().with_store(self.store))
        return self._data[job]

    def stage_policy(self, job: str, stage: int) -> Policy:
        """The policy at the start of `stage` (stage 0: the base model)."""
        if self._policy is None or self._policy[:2] != (job, stage):
            policy = Policy(self.spec(job))
            if stage > 0:
                load_checkpoint_weights(self.store, layout.checkpoint_prefix(job, stage), policy)
            self._policy = (job, stage, policy)
        return self._policy[2]

    def fresh_policy(self, job: str) -> Policy:
        """A policy the caller will change (the trainer's); not cached."""
        self._policy = None
        return Policy(self.spec(job))


def job_warning(jobs: JobRegistry, job: str) -> Callable[..., None]:
    """An influence engine's `warn`: a warning event of `job` (the embedded run prints them)."""
    return lambda message, **data: jobs.event(job, "warning", message, **data)


class TaskRecompute:
    """An influence engine's `recompute` source: a part is recomputed by running its task's handler
    on the job's executor, here and now (the handlers are idempotent and write deterministic bytes)."""

    def __init__(self, executor_for: ExecutorFor, job: str, ctx: TaskContext):
        self.executor_for, self.job, self.ctx = executor_for, job, ctx

    def offline_part(self, set_name: str, index: int) -> None:
        self.executor_for(self.job).offline(OfflineTask(self.job, set_name, index), self.ctx)

    def project_part(self, stage: int, set_name: str, index: int) -> None:
        self.executor_for(self.job).project(ProjectTask(self.job, stage, set_name, index), self.ctx)


class InlineExecutor:
    """The task handlers of `executor: inline` jobs. Each is idempotent: it writes deterministic
    bytes to fixed keys and skips what is already stored."""

    def __init__(self, cache: JobCache):
        self.cache = cache

    def offline(self, task: OfflineTask, ctx: TaskContext) -> dict:
        cache = self.cache
        influence = InfluenceEngine(cache.spec(task.job), cache.store)
        influence.warn = job_warning(ctx.jobs, task.job)
        influence.collect_offline_part(cache.stage_policy(task.job, 0).engine, cache.data(task.job), task.set,
                                       task.part)
        return {"set": task.set, "part": task.part}

    def project(self, task: ProjectTask, ctx: TaskContext) -> dict:
        cache = self.cache
        policy = cache.stage_policy(task.job, task.stage)
        influence = InfluenceEngine(cache.spec(task.job), cache.store, policy.model, policy.tokenizer)
        if influence.needs_behaviour_model(task.stage):
            influence.behaviour = policy.base_model()
        influence.warn = job_warning(ctx.jobs, task.job)
        influence.recompute = TaskRecompute(lambda job: self, task.job, ctx)  # an unreadable offline part
        influence.load_offline(cache.data(task.job))
        popi = influence.popi()
        try:
            influence.project_part(task.stage, task.set, task.part, popi)
        finally:
            popi.close()
        return {"stage": task.stage, "set": task.set, "part": task.part}

    def train(self, task: TrainTask, ctx: TaskContext) -> dict:
        cache = self.cache
        policy = cache.fresh_policy(task.job)
        journal = TrainerJournal(cache.store, ctx.jobs, task.job, ctx.heartbeat, ctx.observer)
        journal.on_stage_end = StageReport(cache.store, cache.spec(task.job), list(cache.data(task.job).validation),
                                           job_warning(ctx.jobs, task.job))
        state = journal.load()
        if state is not None:
            policy.load_state_dict(state["policy"])
        return run_train_task(
            policy, cache.data(task.job), journal, task.stage,
            save=lambda progress: journal.commit(progress, {"policy": policy.state_dict()}),
            put_checkpoint=lambda prefix: put_checkpoint(cache.store, prefix, policy),
        )

    def close(self) -> None:
        pass
