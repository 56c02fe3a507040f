"""The task bus on a real redis-server: at-least-once delivery, reclaim after
the visibility timeout, retries then dead letters, results exactly once."""

import time
from pathlib import Path

import pytest

from cropi.runtime.queue import TaskBus


@pytest.fixture
def bus(redis_server):
    return TaskBus(redis_server.client(), visibility_timeout_s=0.3, max_attempts=3)


def test_a_task_goes_from_submit_to_result(bus):
    assert bus.submit("project", "t1", {"shard": 0})
    task = bus.claim("project", "w1", block_ms=100)
    assert (task.task_id, task.payload, task.attempt) == ("t1", {"shard": 0}, 1)
    assert bus.complete(task, {"ok": True})
    assert bus.result("t1") == {"ok": True}
    assert bus.claim("project", "w2", block_ms=50) is None
    assert bus.depth("project") == {"waiting": 0, "pending": 0}


def test_submitting_the_same_task_id_twice_enqueues_it_once(bus):
    assert bus.submit("train", "stage0-step1", {"step": 1})
    assert not bus.submit("train", "stage0-step1", {"step": 1})
    assert bus.depth("train")["waiting"] == 1


def test_a_dead_workers_task_is_reclaimed_after_the_visibility_timeout_only(bus):
    bus.submit("project", "t1", {})
    first = bus.claim("project", "dies", block_ms=100)
    assert first is not None  # ... and the worker never acknowledges
    assert bus.claim("project", "w2", block_ms=50) is None  # still within the timeout
    time.sleep(0.4)
    again = bus.claim("project", "w2", block_ms=50)
    assert again.task_id == "t1" and again.attempt == 2
    assert bus.depth("project")["pending"] == 1


def test_a_heartbeat_keeps_a_long_task_from_being_reclaimed(bus):
    bus.submit("train", "long", {})
    task = bus.claim("train", "w1", block_ms=100)
    for _ in range(4):
        time.sleep(0.15)
        bus.heartbeat(task, "w1")
    assert bus.claim("train", "w2", block_ms=10) is None
    assert bus.complete(task, {"done": 1})


def test_a_failing_task_is_retried_then_dead_lettered_with_its_error(bus):
    bus.submit("eval", "bad", {"x": 1})
    attempts = []
    while (task := bus.claim("eval", "w", block_ms=50)) is not None:
        attempts.append(task.attempt)
        bus.fail(task, f"ValueError: attempt {task.attempt}")
    assert attempts == [1, 2, 3]
    dead = bus.dead_letters("eval")
    assert [d["task_id"] for d in dead] == ["bad"]
    assert dead[0]["error"] == "ValueError: attempt 3"
    assert bus.result("bad") is None
    assert bus.depth("eval") == {"waiting": 0, "pending": 0}


def test_a_deferred_task_goes_behind_the_others_and_keeps_its_attempts(bus):
    bus.submit("offline", "waits", {"job": "b"})
    bus.submit("offline", "runs", {"job": "a"})
    deferrals = 0
    for _ in range(5):  # far more deferrals than max_attempts: none of them is a failure
        task = bus.claim("offline", "w", block_ms=50)
        if task.task_id == "runs":
            bus.complete(task, {})
            continue
        assert task.attempt == 1
        bus.defer(task)
        deferrals += 1
    assert deferrals == 4 and bus.result("runs") == {}
    task = bus.claim("offline", "w", block_ms=50)
    assert (task.task_id, task.attempt) == ("waits", 1)
    assert bus.dead_letters("offline") == []


def test_a_task_whose_workers_keep_dying_ends_in_the_dead_letter_stream(bus):
    bus.submit("project", "poison", {})
    for n in range(3):
        assert bus.claim("project", f"w{n}", block_ms=50).attempt == n + 1
        time.sleep(0.35)  # worker n dies silently
    assert bus.claim("project", "w9", block_ms=50) is None
    assert [d["task_id"] for d in bus.dead_letters("project")] == ["poison"]
    assert "3 attempts" in bus.dead_letters("project")[0]["error"]


def test_the_first_result_wins_and_duplicates_only_acknowledge(bus):
    bus.submit("project", "t1", {})
    slow = bus.claim("project", "slow", block_ms=100)
    time.sleep(0.35)
    fast = bus.claim("project", "fast", block_ms=50)  # reclaimed while `slow` still works on it
    assert bus.complete(fast, {"by": "fast"})
    assert not bus.complete(slow, {"by": "slow"})
    assert bus.result("t1") == {"by": "fast"}
    assert bus.depth("project")["pending"] == 0


def test_wait_returns_all_results_or_names_the_missing(bus):
    for i in range(3):
        bus.submit("project", f"t{i}", {"i": i})
    for _ in range(2):
        task = bus.claim("project", "w", block_ms=50)
        bus.complete(task, {"i": task.payload["i"]})
    with pytest.raises(TimeoutError, match="1 task"):
        bus.wait(["t0", "t1", "t2"], timeout_s=0.2)
    bus.complete(bus.claim("project", "w", block_ms=50), {"i": 2})
    assert bus.wait(["t0", "t1", "t2"], timeout_s=1) == {f"t{i}": {"i": i} for i in range(3)}


def test_tasks_and_results_survive_a_redis_restart(redis_server):
    bus = TaskBus(redis_server.client(), visibility_timeout_s=0.2)
    bus.submit("project", "waiting", {})
    bus.submit("project", "pending", {})
    bus.submit("project", "done", {})
    claimed = {t.task_id: t for t in (bus.claim("project", "w", block_ms=50) for _ in range(3))}
    bus.complete(claimed["done"], {"ok": 1})
    # "waiting" and "pending" are both delivered-but-unacknowledged now; kill -9 the server
    # after the AOF's once-a-second fsync.
    time.sleep(1.2)
    redis_server.stop(kill=True)
    redis_server.start()
    bus = TaskBus(redis_server.client(), visibility_timeout_s=0.2)
    assert bus.result("done") == {"ok": 1}
    time.sleep(0.25)
    recovered = {bus.claim("project", "w2", block_ms=50).task_id for _ in range(2)}
    assert recovered == {"waiting", "pending"}
    assert not bus.submit("project", "done", {})  # the submit marker survived too


def test_a_restarted_worker_takes_back_its_own_unfinished_task_at_once(bus):
    bus.submit("train", "stage-0", {})
    assert bus.claim("train", "trainer-0", block_ms=50).attempt == 1
    # trainer-0 is killed and its process comes back under the same name: no visibility timeout to wait for
    restarted = TaskBus(bus.r, visibility_timeout_s=60, max_attempts=3)
    again = restarted.claim("train", "trainer-0", block_ms=50)
    assert again.task_id == "stage-0" and again.attempt == 2


def test_a_dead_lettered_task_reports_its_failure(bus):
    bus.submit("eval", "x", {})
    for _ in range(3):
        bus.fail(bus.claim("eval", "w", block_ms=50), "boom")
    assert bus.failure("x") == "boom" and bus.failure("unknown") is None


def test_the_private_server_works_from_a_relative_or_very_long_run_folder(tmp_path, monkeypatch):
    from cropi.runtime.redis_server import RedisServer

    monkeypatch.chdir(tmp_path)
    long_dir = tmp_path / ("x" * 60) / ("y" * 60)
    for folder in ("runs/demo/redis", long_dir):
        server = RedisServer(folder).start()
        try:
            assert server.client().ping()
            assert len(str(server.socket_path)) <= 107
            assert (Path(folder).resolve() / "redis.log").exists()
        finally:
            server.stop()
