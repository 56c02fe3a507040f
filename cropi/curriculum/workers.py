"""Task handlers of the worker services, and the loop that feeds them.

    offline  (rollout service)    sample one part of the offline trajectories
    project  (projector service)  POPI-project one part at the stage-start policy
    train    (trainer service)    run one stage's GRPO steps, then store the next stage's checkpoint

Handlers are idempotent: each writes deterministic bytes to fixed keys and
skips what is already stored. The trainer saves its whole state (weights,
optimizer, progress, metrics) to the store after every step, so a trainer
killed mid-stage resumes after its last completed step, wherever it restarts.
"""

from __future__ import annotations

import io
import json
import logging
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from cropi.curriculum.controller import OFFLINE, PROJECT, TRAIN, spec_key
from cropi.curriculum.policy import Policy, finish_stage, train_stage
from cropi.curriculum.selection import stored_selection
from cropi.curriculum.state import Progress
from cropi.data.sources import JobData, load_job_data
from cropi.influence.engine import InfluenceEngine
from cropi.runtime.hf_store import get_hf_folder, put_hf_folder
from cropi.runtime.jobs import JobRegistry
from cropi.runtime.metrics import WorkerMetrics
from cropi.runtime.queue import Task, TaskBus
from cropi.runtime.store import ObjectStore
from cropi.spec import JobSpec, parse_spec_yaml

log = logging.getLogger(__name__)


class Cancelled(Exception):
    """The job was cancelled while its task ran."""


class Deferred(Exception):
    """The task cannot run yet (a shared service is busy with another job): requeue it, attempt not spent."""


DEFER_PAUSE_S = 1.0  # after a deferral, so that a worker with nothing else to do does not spin on it


def checkpoint_prefix(job: str, stage: int) -> str:
    return f"jobs/{job}/stages/{stage}/checkpoint"


def trainer_state_key(job: str) -> str:
    return f"jobs/{job}/trainer/state.pt"


def put_checkpoint(store: ObjectStore, prefix: str, policy: Policy) -> None:
    """The policy as a consolidated HF folder (config + safetensors + tokenizer), one object per file."""
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
            self._specs[job] = parse_spec_yaml(self.store.get(spec_key(job)).decode(), spec_key(job))
        return self._specs[job]

    def data(self, job: str) -> JobData:
        if job not in self._data:
            self._data[job] = load_job_data(self.spec(job))
        return self._data[job]

    def stage_policy(self, job: str, stage: int) -> Policy:
        """The policy at the start of `stage` (stage 0: the base model)."""
        if self._policy is None or self._policy[:2] != (job, stage):
            policy = Policy(self.spec(job))
            if stage > 0:
                load_checkpoint_weights(self.store, checkpoint_prefix(job, stage), policy)
            self._policy = (job, stage, policy)
        return self._policy[2]

    def fresh_policy(self, job: str) -> Policy:
        """A policy the caller will change (the trainer's); not cached."""
        self._policy = None
        return Policy(self.spec(job))


Observer = Callable[..., None]  # observer(event, **data): progress display of the embedded run


def handle_offline(cache: JobCache, jobs: JobRegistry, payload: dict, heartbeat: Callable[[], None],
                   observer: Observer | None = None) -> dict:
    job = payload["job"]
    influence = InfluenceEngine(cache.spec(job), cache.store)
    influence.collect_offline_part(cache.stage_policy(job, 0).engine, cache.data(job), payload["set"], payload["part"])
    return {"set": payload["set"], "part": payload["part"]}


def handle_project(cache: JobCache, jobs: JobRegistry, payload: dict, heartbeat: Callable[[], None],
                   observer: Observer | None = None) -> dict:
    job, stage = payload["job"], payload["stage"]
    policy = cache.stage_policy(job, stage)
    influence = InfluenceEngine(cache.spec(job), cache.store, policy.model, policy.tokenizer)
    if influence.needs_behaviour_model(stage):
        influence.behaviour = policy.base_model()
    influence.load_offline(cache.data(job))
    popi = influence.popi()
    try:
        influence.project_part(stage, payload["set"], payload["part"], popi)
    finally:
        popi.close()
    return {"stage": stage, "set": payload["set"], "part": payload["part"]}


class TrainerJournal:
    """The trainer's progress and metric records, persisted to the store with each saved step.

    One per train task. `commit` stores the trainer state (the caller's weights and
    optimizer, or where it put them, plus progress and records), rewrites the
    metrics files of the stages that changed, counts the new steps exactly once
    and stops the task when the job was cancelled.
    """

    def __init__(self, store: ObjectStore, jobs: JobRegistry, job: str, heartbeat: Callable[[], None],
                 observer: Observer | None = None, keeper: bool = True):
        """`keeper=False`: follow progress without storing or reporting anything (the other ranks
        of a distributed trainer, whose rank 0 keeps the journal)."""
        self.keeper = keeper
        self.store, self.jobs, self.job = store, jobs, job
        self.heartbeat, self.observer = heartbeat, observer
        self.progress: Progress | None = None
        self.records: dict[str, list[dict]] = {}
        self._dirty: set[str] = set()
        self._counted = 0

    def load(self) -> dict | None:
        """The stored trainer state (None on a fresh job); restores progress and records from it."""
        key = trainer_state_key(self.job)
        if not self.store.exists(key):
            return None
        state = torch.load(io.BytesIO(self.store.get(key)), map_location="cpu", weights_only=False)
        self.progress, self.records = Progress(**state["progress"]), state["records"]
        self._counted = self.progress.step
        # All stages: the previous process may have died between saving its state and writing the files.
        self._dirty = set(self.records)
        return state

    def metric(self, kind: str, step: int, **values: Any) -> None:
        stage = self.progress.stage if self.progress else 0
        record = {"kind": kind, "step": step, **values}
        self.records.setdefault(str(stage), []).append(record)
        self._dirty.add(str(stage))
        if not self.keeper:
            return
        if self.observer:
            self.observer("metric", record=record)
        if kind == "eval_summary":
            self.jobs.update(self.job, metrics=values)  # the step is recorded when it is saved
            self.jobs.event(self.job, "eval", f"step {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in values.items()),
                            step=step, **values)

    def commit(self, progress: Progress, trainer_state: dict[str, Any]) -> None:
        self.progress = progress
        if not self.keeper:
            return
        buf = io.BytesIO()
        torch.save({**trainer_state, "progress": asdict(progress), "records": self.records}, buf)
        self.store.put(trainer_state_key(self.job), buf.getvalue())
        for st in sorted(self._dirty):
            self.store.put(f"jobs/{self.job}/stages/{st}/metrics.jsonl",
                           "".join(_jsonl(r) for r in self.records[st]).encode())
        self._dirty.clear()
        for step in range(self._counted + 1, progress.step + 1):
            self.jobs.count_step(self.job, step)
        if progress.step > self._counted:
            self.jobs.update(self.job, step=progress.step)
        self._counted = max(self._counted, progress.step)
        self.heartbeat()
        if self.jobs.cancel_requested(self.job):
            raise Cancelled(self.job)


def handle_train(cache: JobCache, jobs: JobRegistry, payload: dict, heartbeat: Callable[[], None],
                 observer: Observer | None = None) -> dict:
    job, stage = payload["job"], payload["stage"]
    data, store = cache.data(job), cache.store
    policy = cache.fresh_policy(job)
    journal = TrainerJournal(store, jobs, job, heartbeat, observer)
    state = journal.load()
    if state is not None:
        policy.load_state_dict(state["policy"])

    def save(p: Progress) -> None:
        journal.commit(p, {"policy": policy.state_dict()})

    return run_train_task(policy, data, journal, stage, save, observer)


def run_train_task(policy: Any, data: JobData, journal: TrainerJournal, stage: int,
                   save: Callable[[Progress], None], observer: Observer | None = None,
                   put_final: Callable[[str], None] | None = None) -> dict:
    """One stage of training on `policy` (a `Policy` or anything with its interface), resumable.

    `put_final(prefix)` stores the HF checkpoint of the policy (default: `put_checkpoint`).
    """
    spec, store, job = policy.spec, journal.store, journal.job
    progress = journal.progress
    if progress is None:
        progress = journal.progress = Progress()
        progress.before = progress.after = progress.stage_before = policy.evaluate(data, 0, journal.metric)
        save(progress)
    if progress.stage > stage:  # a re-delivered task whose work was saved already
        return _train_result(progress, stage)
    if progress.stage < stage:
        raise RuntimeError(f"job {job}: trainer is at stage {progress.stage}, asked for stage {stage}")
    selection = stored_selection(store, spec, stage)
    if selection is None:
        raise RuntimeError(f"job {job}: stage {stage} has no stored selection")
    if observer:
        observer("stage_started", stage=stage, progress=progress, selection=selection)
    train_stage(policy, data, progress, selection, journal.metric, save,
                on_step=(lambda stats: observer("step", progress=progress, stats=stats)) if observer else None)
    finish_stage(policy, data, progress, selection)
    put_final = put_final or (lambda prefix: put_checkpoint(store, prefix, policy))
    if progress.stage < spec.curriculum.stages and not progress.stopped_early:
        put_final(checkpoint_prefix(job, progress.stage))
    else:
        put_final(f"jobs/{job}/final/checkpoint")
    save(progress)
    return _train_result(progress, stage)


def _train_result(progress: Progress, stage: int) -> dict:
    summary = next(s for s in progress.stages if s["stage"] == stage)
    last = progress.stages[-1]["stage"] == stage
    return {"stage": stage, "end_step": summary["end_step"], "stopped_early": progress.stopped_early and last,
            "summary": summary}


def _jsonl(record: dict) -> str:
    return json.dumps(record) + "\n"


HANDLERS: dict[str, Callable[..., dict]] = {OFFLINE: handle_offline, PROJECT: handle_project, TRAIN: handle_train}
SERVICE_KINDS = {"rollout": [OFFLINE], "projector": [PROJECT], "trainer": [TRAIN]}


class Worker:
    """Claims tasks of `kinds`, runs their handlers, heartbeats while they run."""

    def __init__(self, kinds: list[str], bus: TaskBus, jobs: JobRegistry, store: ObjectStore, consumer: str,
                 observer: Observer | None = None, fail_fast: bool = False, metrics: WorkerMetrics | None = None,
                 parallel: int = 1):
        """`fail_fast` (the embedded run): a handler error propagates instead of being retried; the
        task stays pending, so running again retries it. `parallel`: tasks of a kind claimed and run
        at once (a projector feeding a Ray pool of that many actors)."""
        self.parallel = parallel
        self._ray = None
        self.metrics = metrics
        self.observer = self._observe if metrics else observer
        self._outer_observer = observer
        self.fail_fast = fail_fast
        self.kinds = kinds
        self.bus = bus
        self.jobs = jobs
        self.cache = JobCache(store)
        self.consumer = consumer
        self.done = 0
        self._current_job = "?"
        self._deferred: dict[str, str] = {}  # job -> the reason its last task was deferred

    def _observe(self, event: str, **data: Any) -> None:
        record = data.get("record", {})
        job = self._current_job
        if event == "metric" and record.get("kind") == "train":
            self.metrics.step.labels(job).set(record["step"])
            self.metrics.reward.labels(job).set(record.get("reward_mean", 0.0))
        elif event == "metric" and record.get("kind") == "eval_summary":
            for key, value in record.items():
                if key not in ("kind", "step"):
                    self.metrics.accuracy.labels(job, key).set(value)
        if self._outer_observer:
            self._outer_observer(event, **data)

    def run(self, stop: threading.Event, max_tasks: int | None = None) -> None:
        while not stop.is_set() and (max_tasks is None or self.done < max_tasks):
            worked = False
            try:
                for kind in self.kinds:
                    tasks = self.claim_some(kind, self.parallel, block_ms=200)
                    if tasks:
                        self.process_all(tasks)
                        worked = True
            except Exception:  # Redis or the store away for longer than the clients retry: wait, go on
                log.exception("worker %s: bus unavailable; retrying in 1 s", self.consumer)
                stop.wait(1.0)
                continue
            if not worked:
                stop.wait(0.05)

    def claim_some(self, kind: str, limit: int, block_ms: int | None) -> list[Task]:
        """Up to `limit` tasks of `kind` (waiting up to `block_ms` for the first only)."""
        first = self.bus.claim(kind, self.consumer, block_ms=block_ms)
        tasks = [first] if first else []
        while tasks and len(tasks) < limit:
            more = self.bus.claim(kind, self.consumer, block_ms=None)
            if more is None:
                break
            tasks.append(more)
        return tasks

    def process_all(self, tasks: list[Task]) -> None:
        """Run `tasks` concurrently (each on its own thread; their compute is elsewhere, e.g. Ray actors)."""
        if len(tasks) == 1:
            self.process(tasks[0])
            return
        with ThreadPoolExecutor(len(tasks)) as threads:
            for future in [threads.submit(self.process, t) for t in tasks]:
                future.result()  # re-raises a fail_fast error

    def handler(self, task: Task) -> Callable[..., dict]:
        """The inline handler, or the Ray executor's for a job with `executor: ray`."""
        job = task.payload.get("job")
        if job is None or self.cache.spec(job).executor != "ray":
            return HANDLERS[task.kind]
        if self._ray is None:
            from cropi.distributed.executor import RayExecutor  # needs the `ray` extra

            self._ray = RayExecutor()
        return getattr(self._ray, task.kind)

    def close(self) -> None:
        """Release the Ray components (pool actors, rollout services) this worker started."""
        if self._ray is not None:
            self._ray.close()
            self._ray = None

    def process(self, task: Task) -> None:
        stop_beat = threading.Event()
        interval = max(0.5, self.bus.visibility_ms / 3000)

        def beat_loop() -> None:
            while not stop_beat.wait(interval):
                self.bus.heartbeat(task, self.consumer)

        beater = threading.Thread(target=beat_loop, daemon=True)
        beater.start()
        job = self._current_job = task.payload.get("job", "?")
        outcome, t0 = "failed", time.perf_counter()
        try:
            if self.jobs.cancel_requested(job):
                raise Cancelled(job)
            result = self.handler(task)(self.cache, self.jobs, task.payload,
                                        lambda: self.bus.heartbeat(task, self.consumer), self.observer)
            result["seconds"] = time.perf_counter() - t0  # compute cost, for wall-clock accounting
            self.bus.complete(task, result)
            outcome = "succeeded"
        except Cancelled:
            self.bus.complete(task, {"cancelled": True})
            outcome = "cancelled"
        except Deferred as why:
            self.bus.defer(task)
            outcome = "deferred"
            if self._deferred.get(job) != str(why):  # once per reason, not once per retry
                self._deferred[job] = str(why)
                self.jobs.event(job, "task_deferred", f"{task.task_id}: {why}")
            time.sleep(DEFER_PAUSE_S)
        except Exception as err:
            if self.fail_fast:
                raise
            log.exception("task %s failed (attempt %d)", task.task_id, task.attempt)
            self.jobs.event(job, "task_failed", f"{task.task_id} attempt {task.attempt}: {type(err).__name__}: {err}")
            self.bus.fail(task, "".join(traceback.format_exception_only(type(err), err)).strip())
        finally:
            stop_beat.set()
            beater.join()
            if outcome != "deferred":
                self.done += 1
                self._deferred.pop(job, None)
            if self.metrics:
                self.metrics.tasks.labels(task.kind, outcome).inc()
                self.metrics.task_seconds.labels(task.kind).observe(time.perf_counter() - t0)
