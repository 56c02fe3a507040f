"""Issue H part 7, one controller acts at a time: controller replicas share a Redis lease, and
the holder's writes carry a fencing token that Redis checks, so that a replica which lost the
lease (stalled, partitioned, killed and restarted) never overwrites what the new holder wrote.

- Fencing tokens strictly increase across acquisitions, whoever acquires.
- Only the holder renews or releases the lease; a stale holder's renewal and release change nothing.
- A stale holder cannot overwrite a finished job's phase, nor add events, nor touch the active set;
  unfenced writers (workers, submissions, cancel requests, the embedded run) are unaffected.
- Two controllers live on one Redis with a submitted job: exactly one ticks; when the holder is
  killed the other takes over once the lease expires, when it is stopped at once (it releases).
- A holder that never noticed losing its lease has its next write refused, stops acting, and
  acquires again (with a newer token) once the lease is free.
- Two `cropi serve controller` processes: SIGKILL the holder, the other carries the job on.

Everything runs on a real redis-server; nothing is mocked.
"""

from __future__ import annotations

import logging
import time

import pytest
import yaml

from cropi.curriculum.controller import Controller
from cropi.runtime.jobs import JobRegistry
from cropi.runtime.lease import ControllerLease, LeaseLost
from cropi.runtime.queue import TaskBus
from cropi.runtime.store import LocalStore
from cropi.spec import parse_spec
from services.controller.stage_loop import StageLoop

from ..jobs import tiny_job
from ..services import LocalCluster

LEASE = "cropi:controller:lease"
FENCE = "cropi:controller:fence"


def wait_until(predicate, timeout_s: float, what: str, step_s: float = 0.02) -> float:
    """Seconds until `predicate()` held; fails naming `what` after `timeout_s`."""
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout_s, f"not within {timeout_s} s: {what}"
        time.sleep(step_s)
    return time.monotonic() - start


def replica(redis_server, store_dir, holder: str, ttl_s: float = 1.0, renew_s: float | None = None,
            poll_s: float | None = None) -> StageLoop:
    """One controller replica as the service runs it: its own Redis client, Controller and lease."""
    r = redis_server.client()
    controller = Controller(TaskBus(r), JobRegistry(r), LocalStore(store_dir))
    return StageLoop(controller, tick_s=0.05, poll_s=poll_s,
                     lease=ControllerLease(r, holder=holder, ttl_s=ttl_s, renew_s=renew_s))


@pytest.fixture
def two_replicas(redis_server, tmp_path):
    loops = [replica(redis_server, tmp_path / "store", name) for name in ("replica-a", "replica-b")]
    yield loops
    for loop in loops:
        loop.stop()


def submit_job(loop: StageLoop, name: str = "leased") -> None:
    assert loop.controller.submit(parse_spec(tiny_job(name=name))) is True


# ------------------------------------------------------------------ the lease itself
def test_fencing_tokens_strictly_increase_across_acquisitions(redis_server):
    r = redis_server.client()
    a = ControllerLease(r, holder="a", ttl_s=0.3)
    b = ControllerLease(r, holder="b", ttl_s=0.3)
    tokens = [a.acquire()]
    assert b.acquire() is None  # held: nobody else acquires, and the fence does not move
    assert int(r.get(FENCE)) == tokens[0]
    a.release()
    tokens.append(b.acquire())  # released: taken at once
    time.sleep(0.45)  # b never renews: expired
    assert r.get(LEASE) is None
    tokens.append(a.acquire())
    tokens.append(a.acquire())  # its own lease again (a holder starting over): a new token too
    assert None not in tokens
    assert all(x < y for x, y in zip(tokens, tokens[1:])), tokens
    assert a.current_token() == tokens[-1] and r.get(LEASE) == b"a"


def test_only_the_holder_renews_or_releases_the_lease(redis_server):
    r = redis_server.client()
    a = ControllerLease(r, holder="a", ttl_s=0.3)
    b = ControllerLease(r, holder="b", ttl_s=5.0)
    assert a.acquire() is not None and a.held
    assert a.renew() and 0 < r.pttl(LEASE) <= 300
    time.sleep(0.45)
    assert not a.held  # not renewed for a ttl: not held, as far as a can tell
    assert b.acquire() is not None
    assert a.renew() is False and a.release() is False  # a's compare-and-set fails: b's lease untouched
    assert r.get(LEASE) == b"b" and r.pttl(LEASE) > 4000
    assert b.release() is True and r.get(LEASE) is None


# ------------------------------------------------------------------ fenced writes
def test_a_stale_holder_cannot_overwrite_a_finished_jobs_phase(redis_server):
    r = redis_server.client()
    jobs = JobRegistry(r)
    jobs.create("fin", "spec: 1")
    old = ControllerLease(r, holder="old", ttl_s=0.3)
    new = ControllerLease(r, holder="new", ttl_s=5.0)
    old_jobs = jobs.fenced(old.acquire())
    old_jobs.update("fin", phase="train", stage=1, status="running")  # while it holds: written
    assert jobs.get("fin")["phase"] == "train"
    time.sleep(0.45)  # old stalls past its lease; new takes over and finishes the job
    new_jobs = jobs.fenced(new.acquire())
    new_jobs.event("fin", "done", "job fin finished")
    new_jobs.update("fin", phase="done", status="succeeded", step=4)
    events_before = jobs.events("fin")

    with pytest.raises(LeaseLost, match="stale"):
        old_jobs.update("fin", phase="train", status="running")  # would put it back in the active set
    with pytest.raises(LeaseLost):
        old_jobs.update("fin", step=9)
    with pytest.raises(LeaseLost):
        old_jobs.event("fin", "stage_started", "stage 1 started")
    r.sadd("cropi:active", "fin")  # (as if it were still active) a stale holder does not remove it either
    with pytest.raises(LeaseLost):
        old_jobs.forget_active("fin")
    assert r.sismember("cropi:active", "fin")
    new_jobs.forget_active("fin")

    rec = jobs.get("fin")
    assert (rec["phase"], rec["status"], rec["step"]) == ("done", "succeeded", 4)
    assert jobs.events("fin") == events_before
    assert "fin" not in jobs.active()


def test_unfenced_writers_are_unaffected_by_the_lease(redis_server):
    """Workers, submissions and cancel requests carry no token; the embedded run has no lease at all."""
    r = redis_server.client()
    jobs = JobRegistry(r)
    ControllerLease(r, holder="someone", ttl_s=5.0).acquire()
    stale = jobs.fenced(0)  # a token no acquisition ever gets
    assert stale.create("w", "spec: 1") is True  # a submission through the controller's fenced view
    stale.request_cancel("w")
    jobs.update("w", step=2, metrics={"acc": 0.5})  # a worker
    assert jobs.count_step("w", 2) == 1
    jobs.event("w", "eval", "evaluated")
    rec = jobs.get("w")
    assert (rec["step"], rec["cancel"], rec["metrics"]) == (2, 1, {"acc": 0.5})
    assert [e["kind"] for e in jobs.events("w")] == ["submitted", "cancel_requested", "eval"]
    with pytest.raises(LeaseLost):
        stale.update("w", phase="offline")


# ------------------------------------------------------------------ two controllers live
def test_two_controllers_live_exactly_one_acts_and_the_other_takes_over_when_it_is_killed(two_replicas, caplog):
    caplog.set_level(logging.INFO, logger="services.controller.stage_loop")
    a, b = two_replicas
    submit_job(b)  # any replica takes submissions
    a.start()
    wait_until(lambda: a.holding, 5, "a acquires the free lease")
    b.start()
    registry = a.registry
    wait_until(lambda: registry.get("leased")["phase"] == "offline", 30, "the holder moves the job on")
    time.sleep(3 * a.lease.ttl_s)  # several ttls: renewed all along, never taken by b
    assert a.holding and not b.holding
    assert a.ticks > 10 and b.ticks == 0
    assert a.controller.bus.depth("offline")["waiting"] > 0  # its tasks are out
    assert registry.r.get(LEASE) == b"replica-a"
    token_a = a.token

    a.stop(release=False)  # killed: nothing released, the lease runs out
    ticks_a, killed = a.ticks, time.monotonic()
    wait_until(lambda: b.holding, a.lease.ttl_s + b.poll_s + 2, "b takes over")
    took_over_s = time.monotonic() - killed
    assert took_over_s > 0.5 * a.lease.ttl_s  # not before a's lease expired (it was renewed ttl/3 ago at most)
    assert b.token > token_a and registry.r.get(LEASE) == b"replica-b"
    registry.request_cancel("leased")
    wait_until(lambda: registry.get("leased")["phase"] == "cancelled", 30, "b carries the job on")
    assert a.ticks == ticks_a
    messages = [rec.getMessage() for rec in caplog.records]
    assert any("acquired by replica-a" in m for m in messages)
    assert any("held by replica-a; replica-b waits" in m for m in messages)
    assert any(f"acquired by replica-b (fencing token {b.token})" in m for m in messages)


def test_a_stopped_controller_releases_the_lease_and_the_other_takes_it_at_once(redis_server, tmp_path):
    a = replica(redis_server, tmp_path / "store", "replica-a", ttl_s=6.0, renew_s=0.2)
    b = replica(redis_server, tmp_path / "store", "replica-b", ttl_s=6.0, renew_s=0.2)
    try:
        a.start()
        wait_until(lambda: a.holding, 5, "a acquires")
        b.start()
        time.sleep(0.5)
        assert not b.holding
        a.stop()
        took_over_s = wait_until(lambda: b.holding, 3, "b takes the released lease")
        assert took_over_s < 1.0  # a poll of b's, not the 6 s ttl
    finally:
        a.stop()
        b.stop()
    assert redis_server.client().get(LEASE) is None  # b released it too


def test_a_holder_that_missed_losing_its_lease_is_refused_and_stops_acting(redis_server, tmp_path, caplog):
    """a's renewer stalls (it would renew in an hour); meanwhile another replica took the lease. a's
    next write is refused: it stops ticking, and acts again only once it acquires the lease anew."""
    caplog.set_level(logging.INFO, logger="services.controller.stage_loop")
    a = replica(redis_server, tmp_path / "store", "replica-a", ttl_s=30.0, renew_s=3600.0, poll_s=0.1)
    try:
        submit_job(a)
        a.start()
        jobs = a.registry
        wait_until(lambda: jobs.get("leased")["phase"] == "offline", 30, "a moves the job on")
        old_token = a.token
        jobs.r.delete(LEASE)  # a's lease expired, unnoticed
        other = ControllerLease(redis_server.client(), holder="replica-b", ttl_s=30.0)
        other_token = other.acquire()
        assert other_token > old_token
        jobs.request_cancel("leased")  # a's tick tries to end the job: a fenced write
        wait_until(lambda: not a.holding, 5, "a stops acting")
        ticks = a.ticks
        time.sleep(0.5)
        assert a.ticks == ticks  # no tick while it waits for the lease
        rec = jobs.get("leased")
        assert rec["phase"] == "offline" and rec["cancel"] == 1  # nothing of a's refused write landed
        assert "cancelled" not in [e["kind"] for e in jobs.events("leased")]
        assert any("lost by replica-a" in m and "write was refused" in m for m in map(logging.LogRecord.getMessage,
                                                                                       caplog.records))
        other.release()
        wait_until(lambda: jobs.get("leased")["phase"] == "cancelled", 10, "a acquires again and acts")
        assert a.token > other_token
    finally:
        a.stop()


def test_two_controller_processes_the_killed_holders_job_is_carried_on(redis_server, tmp_path):
    """Two `cropi serve controller` replicas on one Redis and store, a 2 s lease: SIGKILL the holder."""
    env = {"CROPI_LEASE_TTL_S": "2"}
    store = str(tmp_path / "store")
    first = LocalCluster(redis_server, store, tmp_path / "logs-1", env=env)
    second = LocalCluster(redis_server, store, tmp_path / "logs-2", env=env)
    r = redis_server.client()
    try:
        first.start("controller")
        wait_until(lambda: r.get(LEASE) is not None, 10, "the first replica acquires")
        second.start("controller")
        replicas = {first.procs["controller"].pid: first, second.procs["controller"].pid: second}
        holder = r.get(LEASE).decode()
        holding = next(c for pid, c in replicas.items() if f"-{pid}-" in holder)
        other = second if holding is first else first
        with other.client() as c:  # submitted through the replica that does not act
            assert c.post("/v1/jobs", json={"spec": yaml.safe_dump(tiny_job(name="procs"))}).status_code == 201
        other.wait_phase("procs", ("offline",), timeout_s=60)
        token = int(r.get(FENCE))
        assert "acquired by" in holding.log("controller") and "acquired by" not in other.log("controller")

        holding.kill("controller")
        with other.client() as c:
            assert c.post("/v1/jobs/procs/cancel").status_code == 202
        assert other.wait_phase("procs", ("cancelled",), timeout_s=30)["phase"] == "cancelled"
        assert f"-{other.procs['controller'].pid}-" in r.get(LEASE).decode()
        assert int(r.get(FENCE)) > token
        assert "acquired by" in other.log("controller")
    finally:
        first.stop_all()
        second.stop_all()
