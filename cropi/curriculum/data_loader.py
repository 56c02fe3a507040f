"""Loading a job's data away from the stage machine: one job with a big dataset must not stall
every other job's transitions (a 1M-prompt pool takes tens of seconds to generate), and a load
that runs past its time budget fails its job instead of hanging it.

The stage machine asks `ready(job, spec)` on each tick: the data once loaded, None while loading
(the job waits, the others move on). Memory is bounded by the spec's size caps (spec_limits.py):
a thread's memory cannot be capped on its own.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from cropi.data.sources import JobData
from cropi.errors import InputError
from cropi.spec import JobSpec

BUDGET_ENV = "CROPI_JOB_LOAD_BUDGET_S"
DEFAULT_BUDGET_S = 600.0


def budget_from_env() -> float:
    raw = os.environ.get(BUDGET_ENV, "").strip()
    try:
        value = float(raw) if raw else DEFAULT_BUDGET_S
    except ValueError:
        raise InputError(f"{BUDGET_ENV}: not a number of seconds") from None
    if not 0 < value < float("inf"):
        raise InputError(f"{BUDGET_ENV}: must be a positive number of seconds")
    return value


class JobDataLoader:
    def __init__(self, load: Callable[[JobSpec], JobData], budget_s: float | None = None, threads: int = 2):
        self.load = load
        self.budget_s = budget_from_env() if budget_s is None else budget_s
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="job-data")
        self._loading: dict[str, tuple[Future[JobData], float, JobSpec]] = {}

    def ready(self, job: str, spec_of: Callable[[], JobSpec]) -> tuple[JobSpec, JobData] | None:
        """`job`'s spec and data once loaded (its load's error re-raised), None while it loads;
        `spec_of` is asked once, when the load starts. Past the budget an InputError says so (the
        load thread finishes on its own; its result is dropped)."""
        if job not in self._loading:
            spec = spec_of()
            self._loading[job] = (self._pool.submit(self.load, spec), time.monotonic(), spec)
        future, started, spec = self._loading[job]
        if not future.done():
            if time.monotonic() - started <= self.budget_s:
                return None
            self._loading.pop(job)
            raise InputError(f"loading the job's data took longer than {self.budget_s:.0f} s ({BUDGET_ENV}); "
                             "use smaller data sources or sizes")
        self._loading.pop(job)
        return spec, future.result()

    def forget(self, job: str) -> None:
        self._loading.pop(job, None)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
