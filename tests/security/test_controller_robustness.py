"""Issue H part 4, a controller that can't be knocked over: one test per reproduced finding, each of
which failed before.

- A body is refused while it streams: 401 without the token before any of it is read, 413 at the
  first byte over MAX_BODY_BYTES, chunked or not; the controller's memory does not grow by the body.
- A long-poll answers by its deadline (wait_ms, not a multiple of Redis's socket timeout), and 60
  open long-polls do not delay /healthz; past the long-poll slots a client is told 429, Retry-After.
- An event id Redis cannot take is a 400 naming the parameter; no refusal repeats the value.
- A tick reads the active jobs only: Redis commands per tick do not grow with finished jobs.
- Redis is bounded: an ended job's keys (record, events, step counts, its tasks') expire after the
  retention period, writes for an expired job re-create nothing, acknowledged tasks leave their
  stream, the event and dead-letter streams are capped; the chart caps Redis's memory.
- The controller frees a job's cached view when the job ends.

The controller runs as a real `cropi serve controller` process (or the app in-process) on a real
redis-server; nothing is mocked.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml
from fastapi.testclient import TestClient

from cropi.curriculum.controller import Controller
from cropi.runtime import queue as queue_module
from cropi.runtime.jobs import MAX_EVENTS, JobRegistry
from cropi.runtime.queue import TaskBus
from cropi.runtime.redis_server import RedisServer
from cropi.runtime.store import LocalStore
from cropi.spec import parse_spec
from services.controller.api import MAX_BODY_BYTES, MAX_WAIT_MS, create_app

from ..helm_render import render_chart
from ..jobs import tiny_job
from ..services import TOKEN, LocalCluster

SECRET_ID = "99999999999999999999-0"  # above 2**64: Redis refuses it


# ------------------------------------------------------------------ a controller process
@pytest.fixture(scope="module")
def controller(tmp_path_factory):
    """`cropi serve controller` on its own redis-server, with one (waiting) job submitted."""
    server = RedisServer(Path(tempfile.mkdtemp(prefix="cropi-redis-"))).start()
    root = tmp_path_factory.mktemp("robust")
    cluster = LocalCluster(server, str(root / "store"), root / "logs")
    cluster.start("controller")
    with cluster.client() as c:
        r = c.post("/v1/jobs", json={"spec": yaml.safe_dump(tiny_job(name="robust"))})
        assert r.status_code == 201, r.text
    yield cluster
    cluster.stop_all()
    server.stop()
    shutil.rmtree(server.data_dir, ignore_errors=True)


def peak_rss_mb(cluster: LocalCluster) -> float:
    """The controller process's peak resident memory (VmHWM), MB."""
    status = Path(f"/proc/{cluster.procs['controller'].pid}/status").read_text()
    line = next(x for x in status.splitlines() if x.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def send_chunked(port: int, total: int, token: str | None, chunk: int = 1 << 16) -> int | None:
    """POST /v1/jobs with a chunked body of `total` bytes, on a raw socket; the answer's status.

    The server may answer before the body is through (and then drain or drop the rest): sending
    stops at the first error, and the status is whatever the server answered (None: nothing).
    """
    head = ("POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            "Transfer-Encoding: chunked\r\n" + (f"Authorization: Bearer {token}\r\n" if token else "") + "\r\n")
    piece = f"{chunk:x}\r\n".encode() + b"#" * chunk + b"\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        try:
            s.sendall(head.encode())
            sent = 0
            while sent < total:
                s.sendall(piece)
                sent += chunk
            s.sendall(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass
        try:
            reply = s.recv(4096)
        except (ConnectionResetError, TimeoutError):
            return None
    return int(reply.split(b" ", 2)[1]) if reply.startswith(b"HTTP/1.1 ") else None


@pytest.mark.parametrize("token, status", [(None, 401), (TOKEN, 413)], ids=["no token", "token"])
def test_a_big_chunked_body_is_refused_without_being_read(controller, token, status):
    size = 96 << 20  # the finding: one body in memory, twice (chunks, then joined)
    before = peak_rss_mb(controller)
    big = send_chunked(controller.port, size, token)
    grown = peak_rss_mb(controller) - before
    assert grown < 24, f"controller's peak memory grew by {grown:.0f} MB for a {size >> 20} MiB body"
    assert big in (status, None)  # None: the connection was dropped before the answer was read
    # The status itself, on a body small enough to go through before the answer is read:
    assert send_chunked(controller.port, 2 * MAX_BODY_BYTES, token) == status
    with controller.client() as c:  # and it still works
        assert c.get("/v1/jobs/robust").status_code == 200


def test_a_body_without_the_token_is_not_read(redis_server, tmp_path):
    """401 before the body: the app never receives a byte of it (its receive is never called)."""
    r = redis_server.client()
    app = create_app(TaskBus(r), JobRegistry(r), LocalStore(tmp_path), TOKEN, run_loop=False)
    received = []

    async def receive():
        received.append(1)
        return {"type": "http.request", "body": b"#" * 1024, "more_body": len(received) < 4}

    sent = []

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "path": "/v1/jobs", "raw_path": b"/v1/jobs", "query_string": b"", "root_path": "",
             "headers": [(b"transfer-encoding", b"chunked"), (b"content-type", b"application/json")],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2), "scheme": "http"}
    asyncio.run(app(scope, receive, send))
    assert sent[0]["status"] == 401 and received == []


# ------------------------------------------------------------------ long-polls
def test_a_long_poll_at_the_maximum_wait_answers_by_its_deadline(controller):
    with controller.client() as c:
        last = c.get("/v1/jobs/robust/events").json()[-1]["id"]
        t0 = time.monotonic()
        r = c.get("/v1/jobs/robust/events", params={"after": last, "wait_ms": MAX_WAIT_MS},
                  timeout=MAX_WAIT_MS / 1000 + 15)
        took = time.monotonic() - t0
    assert r.status_code == 200 and r.json() == []
    assert MAX_WAIT_MS / 1000 - 0.5 < took < MAX_WAIT_MS / 1000 + 2, f"wait_ms={MAX_WAIT_MS} answered after {took:.1f} s"


def test_sixty_open_long_polls_do_not_delay_healthz(controller):
    wait_ms = 8000
    with controller.client() as c:
        last = c.get("/v1/jobs/robust/events").json()[-1]["id"]

    async def scenario():
        limits = httpx.Limits(max_connections=100, max_keepalive_connections=100)
        headers = {"Authorization": f"Bearer {TOKEN}"}
        async with httpx.AsyncClient(base_url=controller.url, headers=headers, limits=limits, timeout=30) as polls, \
                httpx.AsyncClient(base_url=controller.url, timeout=30) as probe:

            async def poll():
                t0 = time.monotonic()
                r = await polls.get("/v1/jobs/robust/events", params={"after": last, "wait_ms": wait_ms})
                return r.status_code, time.monotonic() - t0

            tasks = [asyncio.create_task(poll()) for _ in range(60)]
            await asyncio.sleep(1.5)  # all 60 open on the server
            latencies = []
            for _ in range(20):
                t0 = time.monotonic()
                assert (await probe.get("/healthz")).status_code == 200
                latencies.append(time.monotonic() - t0)
                await asyncio.sleep(0.1)
            return latencies, await asyncio.gather(*tasks)

    latencies, polls = asyncio.run(scenario())
    p99 = statistics.quantiles(latencies, n=100)[98]
    assert p99 < 1.0, f"/healthz p99 {p99:.2f} s with 60 long-polls open"
    assert all(status == 200 for status, _ in polls), polls
    assert max(took for _, took in polls) < wait_ms / 1000 + 2


def test_long_polls_past_the_slots_are_told_to_retry(redis_server, tmp_path):
    r = redis_server.client()
    jobs = JobRegistry(r)
    jobs.create("slots", "spec")
    app = create_app(TaskBus(r), jobs, LocalStore(tmp_path), TOKEN, run_loop=False, long_poll_slots=2)
    last = jobs.events("slots")[-1]["id"]
    with TestClient(app, headers={"Authorization": f"Bearer {TOKEN}"}) as client:
        params = {"after": last, "wait_ms": 3000}
        holders = [threading.Thread(target=client.get, args=("/v1/jobs/slots/events",), kwargs={"params": params})
                   for _ in range(2)]
        for t in holders:
            t.start()
        time.sleep(0.5)
        busy = client.get("/v1/jobs/slots/events", params=params)
        assert busy.status_code == 429 and busy.headers["retry-after"] == "1", busy.text
        assert client.get("/v1/jobs/slots/events").status_code == 200  # no wait: no slot needed
        assert client.get("/healthz").status_code == 200
        for t in holders:
            t.join()
        assert client.get("/v1/jobs/slots/events", params={"after": last, "wait_ms": 10}).status_code == 200


# ------------------------------------------------------------------ event ids
@pytest.fixture
def api(redis_server, tmp_path):
    r = redis_server.client()
    jobs = JobRegistry(r)
    jobs.create("ids", "spec")
    app = create_app(TaskBus(r), jobs, LocalStore(tmp_path), TOKEN, run_loop=False)
    return TestClient(app, headers={"Authorization": f"Bearer {TOKEN}"})


@pytest.mark.parametrize("wait_ms", [0, 100])
@pytest.mark.parametrize("after", [SECRET_ID, "0-99999999999999999999", "1-" + "9" * 4000])
def test_an_event_id_redis_cannot_take_is_a_400_naming_the_parameter(api, after, wait_ms):
    r = api.get("/v1/jobs/ids/events", params={"after": after, "wait_ms": wait_ms})
    assert r.status_code == 400, r.text
    assert "'after'" in r.json()["detail"] and after not in r.text


def test_the_largest_event_id_is_valid_and_has_nothing_after_it(api):
    top = f"{2**64 - 1}-{2**64 - 1}"
    assert api.get("/v1/jobs/ids/events", params={"after": top}).json() == []


def test_a_malformed_query_value_is_not_repeated(api):
    r = api.get("/v1/jobs/ids/events", params={"after": "sk_SECRET_4f2a"})
    assert r.status_code == 422 and "after" in r.text and "sk_SECRET_4f2a" not in r.text


# ------------------------------------------------------------------ the stage machine's reads
def redis_commands(r) -> int:
    """Commands Redis ran since the last CONFIG RESETSTAT, INFO and CONFIG themselves excluded."""
    stats = r.info("commandstats")
    return sum(v["calls"] for k, v in stats.items() if k not in ("cmdstat_info", "cmdstat_config"))


def test_a_tick_reads_only_the_active_jobs(redis_server, tmp_path):
    r = redis_server.client()
    jobs = JobRegistry(r)
    controller = Controller(TaskBus(r), jobs, LocalStore(tmp_path / "store"))
    controller.submit(parse_spec(tiny_job(name="running")))
    controller.tick()  # emits its offline tasks; it waits for them from now on (no worker here)
    assert jobs.get("running")["phase"] == "offline"

    def commands_per_tick(ticks: int = 10) -> float:
        r.config_resetstat()
        for _ in range(ticks):
            assert controller.tick() is False
        return redis_commands(r) / ticks

    alone = commands_per_tick()
    for i in range(200):
        jobs.create(f"ended-{i}", "spec")
        jobs.update(f"ended-{i}", phase="done", status="succeeded")
    with_ended = commands_per_tick()
    assert with_ended == alone, f"{alone} Redis commands per tick with 1 job, {with_ended} with 200 more ended"
    assert alone <= 6  # the active set, the job's record, its tasks' outcomes (one round trip)
    jobs.update("running", phase="cancelled", status="cancelled")
    assert commands_per_tick() <= 1  # nothing running: one read


def test_an_active_set_missing_from_an_older_redis_is_rebuilt(redis_server):
    r = redis_server.client()
    old = JobRegistry(r)
    old.create("a", "spec")
    old.create("b", "spec")
    old.update("b", phase="done")
    r.delete("cropi:active", "cropi:active:built")  # as an older cropi left it
    assert JobRegistry(r).active() == ["a"]


# ------------------------------------------------------------------ retention and caps
def ended_job(redis_server, tmp_path, retention_s=3600):
    """A job submitted, its offline tasks emitted, then cancelled: ended by the stage machine."""
    r = redis_server.client()
    bus, jobs = TaskBus(r), JobRegistry(r)
    controller = Controller(bus, jobs, LocalStore(tmp_path / "store"), retention_s=retention_s)
    controller.submit(parse_spec(tiny_job(name="ends")))
    controller.tick()
    task = bus.claim("offline", "w1", block_ms=None)  # one task a worker holds while the job ends
    assert task is not None
    jobs.count_step("ends", 1)
    jobs.request_cancel("ends")
    controller.tick()
    assert jobs.get("ends")["phase"] == "cancelled"
    return r, bus, jobs, controller, task


def test_an_ended_jobs_redis_state_expires_after_the_retention(redis_server, tmp_path):
    r, bus, jobs, _, task = ended_job(redis_server, tmp_path, retention_s=3600)
    keys = ["cropi:job:ends", "cropi:events:ends", "cropi:steps:ends", "cropi:job-tasks:ends"]
    task_ids = [t.decode() for t in r.smembers("cropi:job-tasks:ends")]
    assert task_ids and task.task_id in task_ids
    keys += [f"cropi:submitted:{t}" for t in task_ids]
    for key in keys:
        assert 3500 < r.ttl(key) <= 3600, key
    assert "ends" not in jobs.active() and not r.sismember("cropi:active", "ends")
    # A worker finishing its task after the job ended: its result expires with the rest.
    bus.complete(task, {"cancelled": True})
    assert 3500 < r.ttl(f"cropi:result:{task.task_id}") <= 3600
    # A steps hash first written after the end inherits the job's expiry.
    r.delete("cropi:steps:ends")
    jobs.count_step("ends", 2)
    assert 0 < r.ttl("cropi:steps:ends") <= 3600


def test_an_expired_job_is_gone_and_late_writes_recreate_nothing(redis_server, tmp_path):
    r, bus, jobs, controller, task = ended_job(redis_server, tmp_path, retention_s=1)
    time.sleep(2.1)
    assert r.exists("cropi:job:ends", "cropi:events:ends", "cropi:job-tasks:ends") == 0
    jobs.update("ends", step=3, metrics={"acc": 1.0})  # a straggling worker
    jobs.event("ends", "eval", "late")
    jobs.count_step("ends", 3)
    jobs.request_cancel("ends")
    assert r.exists("cropi:job:ends", "cropi:events:ends", "cropi:steps:ends") == 0
    assert jobs.get("ends") is None and jobs.names() == []
    assert r.zcard("cropi:jobs") == 0  # the name pruned from the index too
    app = create_app(bus, jobs, LocalStore(tmp_path / "store"), TOKEN, run_loop=False)
    with TestClient(app, headers={"Authorization": f"Bearer {TOKEN}"}) as client:
        assert client.get("/v1/jobs").json() == []
        assert client.get("/v1/jobs/ends").status_code == 404


def test_the_same_name_with_another_spec_is_refused_after_expiry(redis_server, tmp_path):
    """Redis forgot the job, the store did not: another spec under its name would run on its artifacts."""
    from cropi.runtime.jobs import JobConflict

    r, bus, jobs, controller, _ = ended_job(redis_server, tmp_path, retention_s=1)
    time.sleep(2.1)
    with pytest.raises(JobConflict, match="different spec"):
        controller.submit(parse_spec(tiny_job(name="ends", seed=7)))
    assert controller.submit(parse_spec(tiny_job(name="ends"))) is True  # the same spec runs again


def test_the_retention_default_is_a_week_and_configurable(monkeypatch):
    from cropi.errors import InputError
    from cropi.runtime.jobs import DEFAULT_RETENTION_S, RETENTION_ENV, retention_from_env

    monkeypatch.delenv(RETENTION_ENV, raising=False)
    assert retention_from_env() == DEFAULT_RETENTION_S == 7 * 24 * 3600
    monkeypatch.setenv(RETENTION_ENV, "3600")
    assert retention_from_env() == 3600
    monkeypatch.setenv(RETENTION_ENV, "0")
    assert retention_from_env() is None  # kept forever
    monkeypatch.setenv(RETENTION_ENV, "-1")
    with pytest.raises(InputError, match=RETENTION_ENV):
        retention_from_env()


def test_acknowledged_tasks_leave_their_stream_and_dead_letters_are_capped(redis_server, monkeypatch):
    r = redis_server.client()
    bus = TaskBus(r, max_attempts=1)
    for i in range(50):
        bus.submit("train", f"j:train:{i}", {"job": "j", "stage": i})
    for i in range(50):
        task = bus.claim("train", "w", block_ms=None)
        if i % 2:
            bus.complete(task, {"ok": True})
        else:
            bus.fail(task, "boom")
    assert r.xlen(bus.stream("train")) == 0
    assert bus.depth("train") == {"waiting": 0, "pending": 0}
    monkeypatch.setattr(queue_module, "MAX_DEAD", 100)
    for i in range(50, 400):
        bus.submit("train", f"j:train:{i}", {"job": "j", "stage": i})
        bus.fail(bus.claim("train", "w", block_ms=None), "boom")
    assert r.xlen(bus.dead_stream("train")) <= 200


def test_a_jobs_event_stream_is_capped(redis_server):
    r = redis_server.client()
    jobs = JobRegistry(r)
    jobs.create("chatty", "spec")
    for i in range(MAX_EVENTS + 1500):
        jobs.event("chatty", "eval", f"step {i}")
    assert r.xlen("cropi:events:chatty") <= MAX_EVENTS + 200


def test_the_chart_caps_redis_memory_without_evicting(tmp_path):
    def redis_args(values=None):
        objects = render_chart(values)
        redis = next(o for o in objects if o["kind"] == "StatefulSet" and o["metadata"]["name"].endswith("-redis"))
        return redis["spec"]["template"]["spec"]["containers"][0]["args"][0]

    args = redis_args()
    assert "--maxmemory 640mb" in args and "--maxmemory-policy noeviction" in args
    assert "--appendonly yes" in args and "--appendfsync everysec" in args
    args = redis_args({"redis": {"maxmemory": "2gb", "appendfsync": "always"}})
    assert "--maxmemory 2gb" in args and "--appendfsync always" in args
    from helm_python.errors import HelmError

    for bad in ({"maxmemoryPolicy": "evict-everything"}, {"maxmemory": "1gb; rm -rf /"}, {"appendfsync": "never"}):
        with pytest.raises(HelmError):
            render_chart({"redis": bad})


# ------------------------------------------------------------------ the controller's own memory
def test_an_ended_jobs_cached_view_is_freed(redis_server, tmp_path):
    r, bus, jobs, controller, _ = ended_job(redis_server, tmp_path)
    assert "ends" not in controller._views
    assert not any(e[0] == "ends" for e in controller._emitted)
    # ... and for a job ended by another writer too (it is dropped from the active set on its next tick)
    controller.submit(parse_spec(tiny_job(name="other")))
    controller.tick()
    assert "other" in controller._views
    jobs.update("other", phase="failed", status="failed")
    r.sadd("cropi:active", "other")  # as if ended by a writer that does not keep the active set
    controller.tick()
    assert "other" not in controller._views and not r.sismember("cropi:active", "other")



def test_a_job_continued_after_it_ended_is_active_again_and_kept(redis_server, tmp_path):
    """`cropi run` continues a failed job by setting a running phase: it is back in the active set, and
    the expiry its end started is off."""
    r, bus, jobs, controller, _ = ended_job(redis_server, tmp_path, retention_s=3600)
    jobs.update("ends", phase="select", status="running", error="")
    assert jobs.active() == ["ends"]
    assert r.ttl("cropi:job:ends") == -1 and r.ttl("cropi:events:ends") == -1
