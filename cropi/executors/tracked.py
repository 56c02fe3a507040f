"""A worker's train tasks, tracked from the worker (`cropi serve trainer`).

`TrackedExecutor` wraps a job's executor: while a train task runs, its
records go to the job's trackers (`tracking.backends`) from this process,
as they are logged (the Ray executor's, when its ranks have run the stage).
W&B and MLflow runs are keyed by the job and its submission time, so every
stage, on whichever trainer, continues the same run. TensorBoard writes to
`CROPI_TENSORBOARD_DIR/<job>` when that is set (a shared volume), else is
skipped. A tracker that cannot start (its client not installed here, its
server away) is a warning event: the job trains on, and its records stay in
the store's report (`executors/report.py`).
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

from cropi.curriculum import layout
from cropi.errors import InputError
from cropi.executors.inline import JobCache, job_warning
from cropi.runtime.tasks import Executor, OfflineTask, ProjectTask, TaskContext, TrainTask
from cropi.tracking.base import open_trackers, run_key
from cropi.tracking.observer import TrackingObserver

TENSORBOARD_ENV = "CROPI_TENSORBOARD_DIR"


def stored_records(cache: JobCache, job: str) -> list[dict]:
    """The records the job's stages have stored so far (their metrics files)."""
    records = []
    for stage in range(cache.spec(job).curriculum.stages):
        key = layout.stage_metrics_key(job, stage)
        if not cache.store.exists(key):
            break
        records += [json.loads(line) for line in cache.store.get(key).decode().splitlines() if line.strip()]
    return records


class TrackedExecutor:
    def __init__(self, inner: Executor, cache: JobCache):
        self.inner, self.cache = inner, cache

    def offline(self, task: OfflineTask, ctx: TaskContext) -> dict:
        return self.inner.offline(task, ctx)

    def project(self, task: ProjectTask, ctx: TaskContext) -> dict:
        return self.inner.project(task, ctx)

    def train(self, task: TrainTask, ctx: TaskContext) -> dict:
        job, spec = task.job, self.cache.spec(task.job)
        warn = job_warning(ctx.jobs, job)
        stored = stored_records(self.cache, job)
        tb_root = os.environ.get(TENSORBOARD_ENV)
        created = (ctx.jobs.get(job) or {}).get("created", "")
        try:
            trackers = open_trackers(spec, run_key(job, created), Path(tb_root) / job if tb_root else None, None,
                                     purge_step=max(r["step"] for r in stored) + 1 if stored else None)
        except InputError as err:
            warn(f"{err} (on trainer {os.uname().nodename}; this stage is not tracked there)")
            trackers = []
        observer = TrackingObserver(trackers, seen=stored, inner=ctx.observer, warn=warn)
        try:
            return self.inner.train(task, replace(ctx, observer=observer))
        finally:
            observer.close()

    def close(self) -> None:
        self.inner.close()
