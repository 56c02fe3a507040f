"""Issue H parts 4 and 6: a poison job cannot stall the stage machine: a job's data loads off the stage
machine's thread (the services' controller), so another job's transitions go on meanwhile, and a
load past its time budget fails its job as the user's to fix instead of hanging it. A transition
that raises (the store away) is retried with backoff, and the job fails only after its retries.

The controller runs on a real redis-server and store folder. The slow load is a stand-in for a
huge dataset (a 1M-prompt pool takes tens of seconds): it blocks until the test lets it go.
"""

from __future__ import annotations

import threading
import time

from cropi.curriculum.controller import Controller, cached_job_data
from cropi.curriculum.data_loader import BUDGET_ENV, JobDataLoader
from cropi.runtime.jobs import JobRegistry, Phase
from cropi.runtime.queue import TaskBus
from cropi.runtime.store import LocalStore
from cropi.spec import parse_spec

from ..jobs import tiny_job


def _controller(redis_server, tmp_path, load, budget_s=60.0) -> tuple[Controller, JobRegistry]:
    r = redis_server.client()
    jobs = JobRegistry(r)
    controller = Controller(TaskBus(r), jobs, LocalStore(tmp_path), loader=JobDataLoader(load, budget_s=budget_s))
    return controller, jobs


def _tick_until(controller: Controller, done, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, "timed out"
        controller.tick()
        time.sleep(0.02)


def test_a_job_whose_data_loads_slowly_does_not_hold_up_another(redis_server, tmp_path):
    release = threading.Event()

    def load(spec):
        if spec.name == "huge":
            release.wait(30)
        return cached_job_data(spec)

    controller, jobs = _controller(redis_server, tmp_path, load)
    controller.submit(parse_spec(tiny_job(name="huge")))
    controller.submit(parse_spec(tiny_job(name="small")))
    started = time.monotonic()
    _tick_until(controller, lambda: jobs.get("small")["phase"] == Phase.OFFLINE)
    assert time.monotonic() - started < 10  # not the 30 s the huge job's load may take
    assert jobs.get("huge")["phase"] == Phase.QUEUED  # it waits for its data, unfailed
    release.set()
    _tick_until(controller, lambda: jobs.get("huge")["phase"] == Phase.OFFLINE)
    controller.loader.close()


def test_a_load_past_its_budget_fails_the_job_as_input(redis_server, tmp_path):
    stop = threading.Event()
    controller, jobs = _controller(redis_server, tmp_path, lambda spec: stop.wait(30), budget_s=0.3)
    controller.submit(parse_spec(tiny_job(name="huge")))
    _tick_until(controller, lambda: jobs.get("huge")["phase"] == Phase.FAILED, timeout_s=10)
    rec = jobs.get("huge")
    assert rec["error_kind"] == "input" and BUDGET_ENV in rec["error"]
    stop.set()
    controller.loader.close()


def test_a_load_that_fails_fails_its_job_with_the_loads_own_error(redis_server, tmp_path):
    from cropi.errors import InputError

    def load(spec):
        raise InputError("data file rows.jsonl, line 3: not JSON")

    controller, jobs = _controller(redis_server, tmp_path, load)
    controller.submit(parse_spec(tiny_job(name="broken")))
    _tick_until(controller, lambda: jobs.get("broken")["phase"] == Phase.FAILED, timeout_s=10)
    assert jobs.get("broken")["error"] == "data file rows.jsonl, line 3: not JSON"
    controller.loader.close()


# ------------------------------------------------------------------ a failing tick is retried
class FlakyStore(LocalStore):
    """A real store folder whose reads fail while `down` is set: the store away for a while."""

    down = False

    def get(self, key: str) -> bytes:
        if self.down:
            raise ConnectionError("store unreachable")
        return super().get(key)


def test_a_transition_that_raises_is_retried_with_backoff_and_the_job_goes_on(redis_server, tmp_path):
    r = redis_server.client()
    jobs, store = JobRegistry(r), FlakyStore(tmp_path)
    controller = Controller(TaskBus(r), jobs, store, retry_delays_s=(0.05, 0.1, 0.2))
    controller.submit(parse_spec(tiny_job(name="flaky")))
    store.down = True
    for _ in range(2):  # two failures, each followed by a wait
        controller.tick()
        time.sleep(0.25)
    rec = jobs.get("flaky")
    assert rec["phase"] == Phase.QUEUED and not rec["error"]
    warnings = [e["message"] for e in jobs.events("flaky") if e["kind"] == "warning"]
    assert warnings == ["the controller failed on this job (ConnectionError); retry 1 of 3 in 0 s",
                        "the controller failed on this job (ConnectionError); retry 2 of 3 in 0 s"]
    store.down = False
    _tick_until(controller, lambda: jobs.get("flaky")["phase"] == Phase.OFFLINE)


def test_a_transition_that_keeps_raising_fails_the_job_after_its_retries(redis_server, tmp_path):
    r = redis_server.client()
    jobs, store = JobRegistry(r), FlakyStore(tmp_path)
    controller = Controller(TaskBus(r), jobs, store, retry_delays_s=(0.01, 0.01))
    controller.submit(parse_spec(tiny_job(name="flaky")))
    store.down = True
    _tick_until(controller, lambda: jobs.get("flaky")["phase"] == Phase.FAILED, timeout_s=10)
    assert jobs.get("flaky")["error"] == "ConnectionError: store unreachable"
    assert sum(e["kind"] == "warning" for e in jobs.events("flaky")) == 2
