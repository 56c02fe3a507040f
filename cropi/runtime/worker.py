"""The loop of a worker service: claim tasks of some kinds from the bus, hand
each to the executor of its job, heartbeat while it runs, record the outcome.

    offline  (rollout service)    project  (projector service)    train  (trainer service)

Which executor runs a job's tasks (inline, Ray) is decided above this layer
and passed in as `executor_for(job)`.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from cropi.errors import InputError
from cropi.runtime.jobs import JobRegistry
from cropi.runtime.metrics import WorkerMetrics
from cropi.runtime.queue import INPUT_ERROR_MARK, Task, TaskBus
from cropi.runtime.tasks import (
    Cancelled,
    Deferred,
    ExecutorFor,
    RunObserver,
    TaskContext,
    TaskKind,
    from_payload,
)

log = logging.getLogger(__name__)

DEFER_PAUSE_S = 1.0  # after a deferral, so that a worker with nothing else to do does not spin on it


class MetricsObserver(RunObserver):
    """A worker's Prometheus gauges from its train tasks' records, then whatever `inner` shows."""

    def __init__(self, metrics: WorkerMetrics, inner: RunObserver):
        self.metrics, self.inner = metrics, inner
        self.job = "?"

    def stage_started(self, stage: int, progress: Any, selection: Any) -> None:
        self.inner.stage_started(stage, progress, selection)

    def step(self, progress: Any, stats: dict[str, float]) -> None:
        self.inner.step(progress, stats)

    def metric(self, record: dict[str, Any]) -> None:
        if record.get("kind") == "train":
            self.metrics.step.labels(self.job).set(record["step"])
            self.metrics.reward.labels(self.job).set(record.get("reward_mean", 0.0))
        elif record.get("kind") == "eval_summary":
            for key, value in record.items():
                if key not in ("kind", "step"):
                    self.metrics.accuracy.labels(self.job, key).set(value)
        self.inner.metric(record)


class Worker:
    """Claims tasks of `kinds`, runs them on their job's executor, heartbeats while they run."""

    def __init__(self, kinds: list[TaskKind], bus: TaskBus, jobs: JobRegistry, executor_for: ExecutorFor,
                 consumer: str, observer: RunObserver | None = None, fail_fast: bool = False,
                 metrics: WorkerMetrics | None = None, parallel: int = 1):
        """`fail_fast` (the embedded run): an executor's error propagates instead of being retried; the
        task stays pending, so running again retries it. `parallel`: tasks of a kind claimed and run
        at once (a projector feeding a Ray pool of that many actors)."""
        self.kinds, self.bus, self.jobs, self.consumer = kinds, bus, jobs, consumer
        self.executor_for = executor_for
        self.metrics = metrics
        observer = observer or RunObserver()
        self.observer = MetricsObserver(metrics, observer) if metrics else observer
        self.fail_fast = fail_fast
        self.parallel = parallel
        self.done = 0
        self._deferred: dict[str, str] = {}  # job -> the reason its last task was deferred

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

    def _run(self, task: Task) -> dict[str, Any]:
        typed = from_payload(task.kind, task.payload)
        executor = self.executor_for(typed.job)
        ctx = TaskContext(self.jobs, lambda: self.bus.heartbeat(task, self.consumer), self.observer)
        run = {TaskKind.OFFLINE: executor.offline, TaskKind.PROJECT: executor.project,
               TaskKind.TRAIN: executor.train}[typed.kind]
        return run(typed, ctx)

    def process(self, task: Task) -> None:
        stop_beat = threading.Event()
        interval = max(0.5, self.bus.visibility_ms / 3000)

        def beat_loop() -> None:
            while not stop_beat.wait(interval):
                self.bus.heartbeat(task, self.consumer)

        beater = threading.Thread(target=beat_loop, daemon=True)
        beater.start()
        job = task.payload.get("job", "?")
        if isinstance(self.observer, MetricsObserver):
            self.observer.job = job
        outcome, t0 = "failed", time.perf_counter()
        try:
            if self.jobs.cancel_requested(job):
                raise Cancelled(job)
            result = self._run(task)
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
        except InputError as err:
            if self.fail_fast:
                raise
            # The job's own settings, data or model: no attempt can succeed, so none is retried.
            log.warning("task %s failed, not retried: %s", task.task_id, err)
            self.jobs.event(job, "task_failed", f"{task.task_id}: {err} (not retried: the job's input must change)")
            self.bus.fail(task, f"{INPUT_ERROR_MARK}{err}", final=True)
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
