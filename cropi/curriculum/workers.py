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
from cropi.runtime.jobs import JobRegistry
from cropi.runtime.metrics import WorkerMetrics
from cropi.runtime.queue import Task, TaskBus
from cropi.runtime.store import ObjectStore
from cropi.spec import JobSpec, parse_spec_yaml

log = logging.getLogger(__name__)


class Cancelled(Exception):
    """The job was cancelled while its task ran."""


def checkpoint_prefix(job: str, stage: int) -> str:
    return f"jobs/{job}/stages/{stage}/checkpoint"


def trainer_state_key(job: str) -> str:
    return f"jobs/{job}/trainer/state.pt"


def put_checkpoint(store: ObjectStore, prefix: str, policy: Policy) -> None:
    """The policy as a consolidated HF folder (config + safetensors), one object per file."""
    with tempfile.TemporaryDirectory() as tmp:
        policy.model.save_pretrained(tmp)
        policy.tokenizer.save_pretrained(tmp)  # a complete folder: usable as model.path
        for path in sorted(Path(tmp).iterdir()):
            store.put(f"{prefix}/{path.name}", path.read_bytes())


def load_checkpoint_weights(store: ObjectStore, prefix: str, policy: Policy) -> None:
    from transformers import AutoModelForCausalLM

    keys = store.list(prefix + "/")
    if not keys:
        raise FileNotFoundError(f"no checkpoint under {prefix}/ in the store")
    with tempfile.TemporaryDirectory() as tmp:
        for key in keys:
            (Path(tmp) / key.rsplit("/", 1)[1]).write_bytes(store.get(key))
        loaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=policy.model.dtype)
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
    influence.load_offline(cache.data(job))
    popi = influence.popi()
    try:
        influence.project_part(stage, payload["set"], payload["part"], popi)
    finally:
        popi.close()
    return {"stage": stage, "set": payload["set"], "part": payload["part"]}


def handle_train(cache: JobCache, jobs: JobRegistry, payload: dict, heartbeat: Callable[[], None],
                 observer: Observer | None = None) -> dict:
    job, stage = payload["job"], payload["stage"]
    spec, data, store = cache.spec(job), cache.data(job), cache.store
    policy = cache.fresh_policy(job)
    state_key = trainer_state_key(job)
    records: dict[str, list[dict]] = {}
    progress: Progress | None = None
    if store.exists(state_key):
        state = torch.load(io.BytesIO(store.get(state_key)), map_location="cpu", weights_only=False)
        policy.load_state_dict(state["policy"])
        progress, records = Progress(**state["progress"]), state["records"]
    counted = {"step": progress.step if progress else 0}
    # Stages whose metrics file is behind `records`; all of them after a restart, since the
    # previous process may have died between saving its state and writing the file.
    dirty = set(records)

    def metric(kind: str, step: int, **values: Any) -> None:
        st = progress.stage if progress else 0
        record = {"kind": kind, "step": step, **values}
        records.setdefault(str(st), []).append(record)
        dirty.add(str(st))
        if observer:
            observer("metric", record=record)
        if kind == "eval_summary":
            jobs.update(job, metrics=values)  # the step is recorded when it is saved
            jobs.event(job, "eval", f"step {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in values.items()),
                       step=step, **values)

    def save(p: Progress) -> None:
        buf = io.BytesIO()
        torch.save({"policy": policy.state_dict(), "progress": asdict(p), "records": records}, buf)
        store.put(state_key, buf.getvalue())
        for st in sorted(dirty):
            store.put(f"jobs/{job}/stages/{st}/metrics.jsonl", "".join(_jsonl(r) for r in records[st]).encode())
        dirty.clear()
        for step in range(counted["step"] + 1, p.step + 1):
            jobs.count_step(job, step)
        if p.step > counted["step"]:
            jobs.update(job, step=p.step)
        counted["step"] = p.step
        heartbeat()
        if jobs.cancel_requested(job):
            raise Cancelled(job)

    if progress is None:
        progress = Progress()
        progress.before = progress.after = progress.stage_before = policy.evaluate(data, 0, metric)
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
    train_stage(policy, data, progress, selection, metric, save,
                on_step=(lambda stats: observer("step", progress=progress, stats=stats)) if observer else None)
    finish_stage(policy, data, progress, selection)
    if progress.stage < spec.curriculum.stages and not progress.stopped_early:
        put_checkpoint(store, checkpoint_prefix(job, progress.stage), policy)
    else:
        put_checkpoint(store, f"jobs/{job}/final/checkpoint", policy)
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
                 observer: Observer | None = None, fail_fast: bool = False, metrics: WorkerMetrics | None = None):
        """`fail_fast` (the embedded run): a handler error propagates instead of being retried; the
        task stays pending, so running again retries it."""
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
                    task = self.bus.claim(kind, self.consumer, block_ms=200)
                    if task is not None:
                        self.process(task)
                        worked = True
            except Exception:  # Redis or the store away for longer than the clients retry: wait, go on
                log.exception("worker %s: bus unavailable; retrying in 1 s", self.consumer)
                stop.wait(1.0)
                continue
            if not worked:
                stop.wait(0.05)

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
            result = HANDLERS[task.kind](self.cache, self.jobs, task.payload,
                                         lambda: self.bus.heartbeat(task, self.consumer), self.observer)
            result["seconds"] = time.perf_counter() - t0  # compute cost, for wall-clock accounting
            self.bus.complete(task, result)
            outcome = "succeeded"
        except Cancelled:
            self.bus.complete(task, {"cancelled": True})
            outcome = "cancelled"
        except Exception as err:
            if self.fail_fast:
                raise
            log.exception("task %s failed (attempt %d)", task.task_id, task.attempt)
            self.jobs.event(job, "task_failed", f"{task.task_id} attempt {task.attempt}: {type(err).__name__}: {err}")
            self.bus.fail(task, "".join(traceback.format_exception_only(type(err), err)).strip())
        finally:
            stop_beat.set()
            beater.join()
            self.done += 1
            if self.metrics:
                self.metrics.tasks.labels(task.kind, outcome).inc()
                self.metrics.task_seconds.labels(task.kind).observe(time.perf_counter() - t0)
