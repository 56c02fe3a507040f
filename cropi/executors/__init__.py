"""Where a job's tasks run: `inline` (the worker's own process) or `ray`.

`JobExecutors` is what a worker is given: it reads a job's spec and returns
the executor its `executor:` field names. The Ray executor is built on
first use, since it needs the `ray` extra.
"""

from __future__ import annotations

from cropi.executors.inline import InlineExecutor, JobCache
from cropi.runtime.store import ObjectStore
from cropi.runtime.tasks import Executor


class JobExecutors:
    def __init__(self, store: ObjectStore, track: bool = False):
        """`track` (a worker service): train tasks also log to their job's trackers from this process
        (`tracked.py`); the embedded run tracks in its own process instead."""
        self.cache = JobCache(store)
        self.inline = InlineExecutor(self.cache)
        self.track = track
        self._ray = None

    def __call__(self, job: str) -> Executor:
        executor = self._executor(job)
        if self.track:
            from cropi.executors.tracked import TrackedExecutor

            return TrackedExecutor(executor, self.cache)
        return executor

    def _executor(self, job: str) -> Executor:
        if self.cache.spec(job).executor != "ray":
            return self.inline
        if self._ray is None:
            from cropi.executors.ray.executor import RayExecutor  # needs the `ray` extra

            self._ray = RayExecutor(self.cache)
        return self._ray

    def close(self) -> None:
        """Release the Ray components (pool actors, rollout services) started for these jobs."""
        if self._ray is not None:
            self._ray.close()
            self._ray = None
