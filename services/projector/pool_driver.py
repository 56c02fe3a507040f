"""A projector service whose `project` tasks all run on one Ray projection pool.

The controller submits one `project` task per part. This worker claims up to
one task per pool actor, runs them at once (each on its own thread, waiting
on its actor), heartbeats each while it runs and completes or fails it on the
bus: the claim/heartbeat/complete/fail loop of `Worker`, with the pool as the
handler of every task.
"""

from __future__ import annotations

from collections.abc import Callable

from cropi.curriculum.controller import PROJECT
from cropi.curriculum.workers import Worker
from cropi.distributed.projection_pool import ProjectionPool, handle_project_on_pool
from cropi.runtime.jobs import JobRegistry
from cropi.runtime.metrics import WorkerMetrics
from cropi.runtime.queue import Task, TaskBus
from cropi.runtime.store import ObjectStore


class PoolProjectorService(Worker):
    def __init__(self, pool: ProjectionPool, bus: TaskBus, jobs: JobRegistry, store: ObjectStore, consumer: str,
                 metrics: WorkerMetrics | None = None):
        super().__init__([PROJECT], bus, jobs, store, consumer, metrics=metrics, parallel=pool.size)
        self.pool = pool

    def handler(self, task: Task) -> Callable[..., dict]:
        return lambda cache, jobs, payload, heartbeat, observer=None: handle_project_on_pool(self.pool, payload)
