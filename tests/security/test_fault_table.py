"""Issue H, the fault table (docs/faults.md): each fault injected into the real part that meets it,
and what cropi must do then. One section per row of the table.

1. The disk refuses a write (stood in for by the file-size limit, RLIMIT_FSIZE: writes past it fail
   with EFBIG, as writes on a full disk fail with ENOSPC; no root needed): the write fails naming its
   key, no truncated object or temp file is left, the job stops and continues once the write fits.
   A process killed while it overwrites the trainer state leaves the old or the new state, readable.
2. A flipped byte in a stored part: offline and gradient parts are recomputed (tests/security/
   test_recovery.py); a flipped trainer state is refused by its checksum, naming its key.
3. redis-server SIGKILLed while job records and tasks are written: under `appendfsync always` no
   acknowledged write is lost; under `everysec` none older than the fsync window; the controller
   restarted on the restarted Redis resubmits nothing twice and the job ends as an undisturbed one.
4. The S3 endpoint unreachable (a loopback proxy in front of moto's S3 server refusing connections):
   the client rides out an outage shorter than its retry budget; a longer one fails the task with a
   message naming the endpoint and the budget, and the worker's next attempt continues the job.
5. Two controllers at once: tests/security/test_controller_lease.py.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from rich.console import Console

from cropi.curriculum import layout
from cropi.curriculum.controller import Controller
from cropi.data.rewards import register_verifier
from cropi.embedded import KINDS, run_job
from cropi.executors import JobExecutors
from cropi.executors.inline import Policy
from cropi.runtime.config import redis_client
from cropi.runtime.jobs import TERMINAL, JobRegistry
from cropi.runtime.queue import TaskBus
from cropi.runtime.redis_server import RedisServer
from cropi.runtime.s3store import S3Store
from cropi.runtime.store import ChecksumError, LocalStore
from cropi.runtime.tasks import OfflineTask, TaskKind, to_payload
from cropi.runtime.worker import Worker
from cropi.spec import parse_spec

from ..conftest import stand_in_verifier
from ..jobs import tiny_job
from ..netutil import TcpProxy

ROOT = Path(__file__).resolve().parents[2]
JOB = tiny_job(name="faults")
NAME = JOB["name"]
STATE = layout.trainer_state_key(NAME)
MB = 1 << 20


class Killed(BaseException):
    """The process dying at this point: no handler of the run catches it."""


def die(*args, **kwargs):
    raise Killed()


def run_quietly(run_dir: Path):
    return run_job(parse_spec(JOB), run_dir, Console(quiet=True))


def selections(store: LocalStore) -> list[dict]:
    out = []
    for stage in range(JOB["curriculum"]["stages"]):
        sel = json.loads(store.get(layout.selection_key(NAME, stage)))
        out.append({k: v for k, v in sel.items() if k != "seconds"})  # a measurement, not a result
    return out


def child(code: str, fsize: int | None = None, **kw) -> subprocess.Popen:
    """`python -c code` in the repository, its file size limited to `fsize` bytes (Python ignores
    SIGXFSZ, so a write past the limit fails with EFBIG instead of killing the process)."""
    limit = (lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, resource.RLIM_INFINITY))) if fsize else None
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, preexec_fn=limit, text=True, **kw)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model) -> Path:
    run_dir = tmp_path_factory.mktemp("reference")
    with register_verifier("int", stand_in_verifier):
        run_quietly(run_dir)
    return run_dir


# --------------------------------------------------------------------------- 1. the disk refuses a write


def test_a_write_the_disk_refuses_fails_naming_its_key_and_leaves_the_stored_object_whole(tmp_path):
    store = LocalStore(tmp_path / "store")
    store.put("a/old", b"o" * 1000)
    code = f"""
import os
from cropi.runtime.store import LocalStore
s = LocalStore({str(tmp_path / 'store')!r})
s.put("a/small", b"s" * 1000)
for key in ("a/new", "a/old"):
    try:
        s.put(key, b"n" * {2 * MB})
    except OSError as err:
        print(err.errno, err)
"""
    proc = child(code, fsize=MB, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    lines = out.splitlines()
    assert len(lines) == 2, out
    for line, key in zip(lines, ("a/new", "a/old")):
        assert line.startswith("27 ") and "File too large" in line and f"cannot store object {key!r}" in line
    assert store.get("a/small") == b"s" * 1000  # what fits is written
    assert not store.exists("a/new") and store.list("a") == ["a/old", "a/small"]
    assert store.get("a/old") == b"o" * 1000, "the refused overwrite left the old object readable"
    assert not [p.name for p in (tmp_path / "store" / "a").iterdir() if p.name.startswith(".")], "temp files left"


def test_a_job_whose_trainer_state_does_not_fit_stops_and_continues_once_it_fits(reference, tmp_path,
                                                                                 mixed_rewards):
    run_dir = tmp_path / "run"
    code = f"""
from pathlib import Path
from rich.console import Console
from cropi.data.rewards import register_verifier
from cropi.embedded import run_job
from cropi.spec import parse_spec
from tests.conftest import stand_in_verifier
with register_verifier("int", stand_in_verifier):
    run_job(parse_spec({JOB!r}), Path({str(run_dir)!r}), Console(quiet=True))
"""
    # 8 MB: the parts, checkpoints (4 MB) and the first trainer state fit; the state with Adam's
    # moments (13 MB, written after step 1) does not.
    proc = child(code, fsize=8 * MB, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=os.environ.copy())
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1
    assert f"OSError: [Errno 27] File too large: cannot store object '{STATE}'" in err.splitlines()[-1]
    store = LocalStore(run_dir / "store")
    assert store.get(STATE), "the last state that fitted is stored whole"
    assert not [p for p in (run_dir / "store").rglob(".*") if p.is_file()], "temp files left"

    result = run_quietly(run_dir)  # the space is back: the same command continues the job
    assert result.steps == 4
    assert selections(store) == selections(LocalStore(reference / "store"))
    assert step_counts_of(run_dir) == {step: 1 for step in range(1, 5)}


def step_counts_of(run_dir: Path) -> dict[int, int]:
    """The step counts in an ended embedded run's Redis (its AOF, in the run folder)."""
    with RedisServer(run_dir / "redis") as server:
        return JobRegistry(server.client()).step_counts(NAME)


def test_a_process_killed_while_it_overwrites_the_trainer_state_leaves_a_readable_one(tmp_path):
    """Before the fix, 9 of 20 kills left the new bytes beside the old checksum: a job that could not resume."""
    root = tmp_path / "store"
    code = f"""
import os
from cropi.runtime.store import LocalStore
s, i = LocalStore({str(root)!r}), 0
s.put({STATE!r}, b"0")
print("ready", flush=True)
while True:
    i += 1
    s.put({STATE!r}, os.urandom(16) * 65536 + str(i).encode())
"""
    for delay in (0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6):
        proc = child(code, stdout=subprocess.PIPE)
        assert proc.stdout.readline() == "ready\n"
        time.sleep(delay)
        proc.kill()
        proc.wait()
        proc.stdout.close()
        LocalStore(root).get(STATE)  # ChecksumError before the fix


# --------------------------------------------------------------------------- 2. a flipped byte


def test_a_flipped_byte_in_the_trainer_state_is_refused_naming_its_key(tmp_path, tiny_model, mixed_rewards,
                                                                       monkeypatch):
    """Offline and gradient parts are recomputed (test_recovery.py); the trainer state cannot be: it is
    the training so far. It is refused, never loaded as if whole, and left for the operator."""
    run_dir = tmp_path / "run"
    steps = []

    def second_step_dies(self, step, batches):
        if step == 2:
            raise Killed()
        steps.append(step)
        return real(self, step, batches)

    real = Policy.train_step
    with monkeypatch.context() as m:
        m.setattr(Policy, "train_step", second_step_dies)
        with pytest.raises(Killed):
            run_quietly(run_dir)
    path = run_dir / "store" / STATE
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match=f"object '{STATE}' .* is corrupted"):
        run_quietly(run_dir)
    assert path.read_bytes() == bytes(data), "the damaged state is kept as it is, for inspection"


# --------------------------------------------------------------------------- 3. redis-server SIGKILLed


def redis_server(appendfsync: str) -> RedisServer:
    return RedisServer(Path(tempfile.mkdtemp(prefix="cropi-redis-")), appendfsync=appendfsync).start()


def acknowledged_writes_lost(server: RedisServer, write_s: float) -> tuple[int, list[float]]:
    """Submit tasks and count steps (one job record write each) for `write_s`, SIGKILL the server,
    restart it from its AOF; (writes acknowledged, age at the kill of each acknowledged write lost)."""
    client = server.client(retry=Retry(NoBackoff(), 0))  # no retry: the first error ends the writer
    bus, jobs, job = TaskBus(client), JobRegistry(client), f"loss-{time.monotonic_ns()}"
    jobs.create(job, f"name: {job}")
    acked: list[tuple[int, float]] = []

    def write() -> None:
        i = 0
        while True:
            i += 1
            try:
                bus.submit("offline", f"{job}-{i}", {"job": job, "i": i})
                jobs.count_step(job, i)
            except (redis.ConnectionError, OSError):
                return
            acked.append((i, time.monotonic()))

    writer = threading.Thread(target=write)
    writer.start()
    time.sleep(write_s)
    server.stop(kill=True)
    killed_at = time.monotonic()
    writer.join(timeout=30)
    server.start()
    client = server.client()
    bus, counts = TaskBus(client), JobRegistry(client).step_counts(job)
    lost = [killed_at - t for i, t in acked if bus.submit("offline", f"{job}-{i}", {}) or counts.get(i) != 1]
    return len(acked), lost


def test_under_appendfsync_always_a_sigkilled_redis_loses_no_acknowledged_write():
    server = redis_server("always")
    try:
        for _ in range(3):
            acked, lost = acknowledged_writes_lost(server, write_s=1.0)
            assert acked > 50 and lost == [], f"{len(lost)} of {acked} acknowledged writes lost"
    finally:
        server.stop()
        shutil.rmtree(server.data_dir, ignore_errors=True)


def test_under_appendfsync_everysec_a_sigkilled_redis_keeps_everything_older_than_its_fsync_window():
    server = redis_server("everysec")
    try:
        acked, lost = acknowledged_writes_lost(server, write_s=3.0)
        assert acked > 50 and all(age < 2.5 for age in lost), f"{len(lost)} of {acked} lost, ages {lost[:5]}"
    finally:
        server.stop()
        shutil.rmtree(server.data_dir, ignore_errors=True)


def drive(controller: Controller, worker: Worker, until) -> dict:
    """The embedded run's loop: tick, then run one task, until `until(record)` or the job ends."""
    while True:
        controller.tick()
        rec = controller.jobs.get(NAME)
        if rec["phase"] in TERMINAL or until(rec):
            return rec
        for kind in KINDS:
            tasks = worker.claim_some(kind, 1, block_ms=None)
            if tasks:
                worker.process_all(tasks)
                break


def test_a_controller_on_a_sigkilled_and_restarted_redis_resubmits_nothing_and_the_job_ends_as_undisturbed(
        reference, tmp_path, mixed_rewards):
    server = redis_server("always")
    try:
        client = redis_client(server.url, outage_s=10)
        bus, jobs, store = TaskBus(client), JobRegistry(client), LocalStore(tmp_path / "store")
        controller = Controller(bus, jobs, store)
        controller.submit(parse_spec(JOB))
        worker = Worker(list(KINDS), bus, jobs, JobExecutors(store), "w", fail_fast=True)
        drive(controller, worker, until=lambda rec: rec["phase"] == TaskKind.PROJECT)
        queued = bus.depth(TaskKind.PROJECT)
        assert queued["waiting"] > 0

        server.stop(kill=True)
        server.start()
        restarted = Controller(bus, jobs, store)  # a controller that restarted with Redis: resubmits
        restarted.tick()
        assert jobs.get(NAME)["phase"] == TaskKind.PROJECT
        assert bus.depth(TaskKind.PROJECT) == queued, "tasks submitted twice"
        rec = drive(restarted, worker, until=lambda rec: False)
        assert rec["phase"] == "done", rec
        assert jobs.step_counts(NAME) == {step: 1 for step in range(1, 5)}
        assert selections(store) == selections(LocalStore(reference / "store"))
    finally:
        server.stop()
        shutil.rmtree(server.data_dir, ignore_errors=True)


# --------------------------------------------------------------------------- 4. S3 unreachable


@pytest.fixture
def s3(moto_server):
    """A proxy in front of moto's S3 endpoint (`cut()`: connections refused) and a store through it."""
    proxy = TcpProxy(moto_server.port)
    yield proxy, lambda budget_s: S3Store(proxy.endpoint, "outage", "testing", "testing", prefix="faults",
                                          retry_deadline_s=budget_s)
    proxy.cut()


def outage(proxy: TcpProxy, seconds: float) -> threading.Timer:
    proxy.cut()
    timer = threading.Timer(seconds, proxy.restore)
    timer.start()
    return timer


def test_an_s3_outage_shorter_than_the_retry_budget_is_ridden_out(s3):
    proxy, open_store = s3
    store = open_store(6.0)
    store.put("before", b"b")
    outage(proxy, 2.0)
    t0 = time.monotonic()
    store.put("during", b"d" * 1000)
    assert 2.0 <= time.monotonic() - t0 < 6.0
    outage(proxy, 2.0).join()
    assert store.get("during") == b"d" * 1000 and store.get("before") == b"b"


def test_an_s3_outage_longer_than_the_budget_fails_naming_the_endpoint_and_the_next_attempt_continues(
        s3, redis_server, reference, tiny_model):
    proxy, open_store = s3
    store = open_store(2.0)
    store.put(layout.spec_key(NAME), parse_spec(JOB).to_yaml().encode())
    t0 = time.monotonic()
    back = outage(proxy, 3.5)
    with pytest.raises(ConnectionError, match=rf"object store {proxy.endpoint} unreachable for 2 s"):
        store.get(layout.spec_key(NAME))
    assert 1.0 < time.monotonic() - t0 < 3.5

    # A worker's task meets the same outage: its first attempt fails with that message, the next
    # (right after, on the bus) continues once S3 is back, and stores what an undisturbed run stored.
    client = redis_server.client()
    bus, jobs = TaskBus(client), JobRegistry(client)
    jobs.create(NAME, parse_spec(JOB).to_yaml())
    task = OfflineTask(NAME, "pool", 0)
    bus.submit(task.kind, task.task_id, to_payload(task))
    worker = Worker([TaskKind.OFFLINE], bus, jobs, JobExecutors(store), "w")
    back.join()
    outage(proxy, 3.0)
    with register_verifier("int", stand_in_verifier):
        for _ in range(2):
            worker.process(bus.claim(task.kind, "w", block_ms=1000))
    failed = [e["message"] for e in jobs.events(NAME) if e["kind"] == "task_failed"]
    assert len(failed) == 1 and "attempt 1: ConnectionError: object store" in failed[0], failed
    result = bus.result(task.task_id)
    assert result is not None and {k: result[k] for k in ("set", "part")} == {"set": "pool", "part": 0}
    key = layout.offline_part_key(NAME, "pool", 0)
    assert store.get(key) == LocalStore(reference / "store").get(key)
