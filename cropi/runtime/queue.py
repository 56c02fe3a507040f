"""The task bus: one Redis stream + consumer group per task kind (docs/design.md §6).

Delivery is at-least-once. A task stays in its group's pending list until a
worker acknowledges it; a worker that dies leaves it there, and after
`visibility_timeout_s` of silence any worker reclaims it (`XAUTOCLAIM`).
A task that has been handed out `max_attempts` times without success goes to
the dead-letter stream instead of being retried forever.

Results are exactly-once: the first result written for a task id wins
(`SET NX`) and later duplicates of the same task only acknowledge. Handlers
must still be idempotent, since a reclaimed task may run twice; the stores
they write to make that cheap (same key, same bytes).

Keys (prefix `cropi` by default):

    <p>:tasks:<kind>          stream of tasks            group <p>:workers
    <p>:dead:<kind>           dead-letter stream
    <p>:attempts:<kind>       hash task id -> deliveries
    <p>:result:<task id>      JSON result (first writer wins)
    <p>:submitted:<task id>   marker that makes submit idempotent
    <p>:failed:<task id>      the error of a dead-lettered task
    <p>:job-tasks:<job>       set of the task ids submitted for a job (payload field `job`)

Bounded: an entry leaves its stream when it is acknowledged (XACK + XDEL in
one transaction), the dead-letter stream is capped at about MAX_DEAD entries,
and `expire_job` gives a finished job's per-task keys the job's retention
(a result written after that inherits it).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import redis

GROUP = "workers"
MAX_DEAD = 10_000
# The error of a task that failed for its job's input (settings, data, model): it was not retried,
# and its job fails as the user's to fix (exit code 2 in `cropi`), not as a crash.
INPUT_ERROR_MARK = "input error: "


@dataclass
class Task:
    kind: str
    task_id: str
    payload: dict[str, Any]
    entry_id: str  # the stream entry currently carrying it
    attempt: int  # 1 on first delivery


class TaskBus:
    def __init__(self, client: redis.Redis, prefix: str = "cropi", visibility_timeout_s: float = 60.0,
                 max_attempts: int = 3):
        if max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        self.r = client
        self.prefix = prefix
        self.visibility_ms = int(visibility_timeout_s * 1000)
        self.max_attempts = max_attempts
        self._groups: set[str] = set()
        self._recovered: set[tuple[str, str]] = set()

    # ---------------------------------------------------------------- keys
    def stream(self, kind: str) -> str:
        return f"{self.prefix}:tasks:{kind}"

    def dead_stream(self, kind: str) -> str:
        return f"{self.prefix}:dead:{kind}"

    def _attempts(self, kind: str) -> str:
        return f"{self.prefix}:attempts:{kind}"

    def _result(self, task_id: str) -> str:
        return f"{self.prefix}:result:{task_id}"

    def _failed(self, task_id: str) -> str:
        return f"{self.prefix}:failed:{task_id}"

    def _submitted(self, task_id: str) -> str:
        return f"{self.prefix}:submitted:{task_id}"

    def _job_tasks(self, job: str) -> str:
        return f"{self.prefix}:job-tasks:{job}"

    def _ensure_group(self, kind: str) -> None:
        if kind in self._groups:
            return
        try:
            self.r.xgroup_create(self.stream(kind), GROUP, id="0", mkstream=True)
        except redis.ResponseError as err:
            if "BUSYGROUP" not in str(err):
                raise
        self._groups.add(kind)

    # ------------------------------------------------------------ producer
    def submit(self, kind: str, task_id: str, payload: dict[str, Any]) -> bool:
        """Enqueue a task once: a second submit of the same id (a restarted controller) is a no-op.

        Returns True if this call enqueued it.
        """
        self._ensure_group(kind)
        marker = self._submitted(task_id)
        job = payload.get("job")
        body = json.dumps(payload, sort_keys=True)
        # MULTI/EXEC: the marker and the entry exist together or not at all.
        pipe = self.r.pipeline(transaction=True)
        while True:
            try:
                pipe.watch(marker)
                if pipe.exists(marker):
                    pipe.reset()
                    return False
                pipe.multi()
                pipe.set(marker, "1")
                pipe.xadd(self.stream(kind), {"task_id": task_id, "payload": body})
                if isinstance(job, str):
                    pipe.sadd(self._job_tasks(job), task_id)
                pipe.execute()
                return True
            except redis.WatchError:
                continue

    # ------------------------------------------------------------ consumer
    def claim(self, kind: str, consumer: str, block_ms: int | None = 1000) -> Task | None:
        """The next task for `consumer`: a stale one first (its worker went silent), else a new one.

        Waits up to `block_ms` for a new task; None does not wait.
        """
        self._ensure_group(kind)
        task = None
        if (kind, consumer) not in self._recovered:
            # Once per (kind, consumer) and bus instance: a restarted worker process, same name.
            self._recovered.add((kind, consumer))
            task = self._own_pending(kind, consumer)
        task = task or self._reclaim(kind, consumer)
        if task is not None:
            return task
        reply = self.r.xreadgroup(GROUP, consumer, {self.stream(kind): ">"}, count=1, block=block_ms)
        return self._first_task(kind, [e for _stream, entries in reply or [] for e in entries])

    def _own_pending(self, kind: str, consumer: str) -> Task | None:
        """A restarted worker (same consumer name) first takes back what it held when it died."""
        reply = self.r.xreadgroup(GROUP, consumer, {self.stream(kind): "0"}, count=10)
        return self._first_task(kind, [e for _stream, entries in reply or [] for e in entries])

    def _reclaim(self, kind: str, consumer: str) -> Task | None:
        reply = self.r.xautoclaim(self.stream(kind), GROUP, consumer, self.visibility_ms, start_id="0-0", count=1)
        # Redis 6.2 replies [cursor, entries]; 7+ adds the ids it found deleted.
        return self._first_task(kind, reply[1] if len(reply) > 1 else [])

    def _first_task(self, kind: str, entries: list) -> Task | None:
        for entry_id, fields in entries:
            if not fields:  # deleted from the stream while pending
                self._ack(kind, entry_id)
                continue
            task = self._deliver(kind, entry_id, fields)
            if task is not None:
                return task
        return None

    def _deliver(self, kind: str, entry_id: Any, fields: dict) -> Task | None:
        entry_id = _s(entry_id)
        task_id = _s(fields[b"task_id"] if b"task_id" in fields else fields["task_id"])
        payload = json.loads(_s(fields[b"payload"] if b"payload" in fields else fields["payload"]))
        attempt = int(self.r.hincrby(self._attempts(kind), task_id, 1))
        if self.r.exists(self._result(task_id)):
            # Done already (a duplicate delivery after the result was written): just acknowledge.
            self._ack(kind, entry_id)
            return None
        if attempt > self.max_attempts:
            self._dead_letter(kind, entry_id, task_id, payload, f"gave up after {self.max_attempts} attempts")
            return None
        return Task(kind, task_id, payload, entry_id, attempt)

    def heartbeat(self, task: Task, consumer: str) -> None:
        """Tell the bus a long task is still alive (resets its idle time, keeps its attempt count)."""
        self.r.xclaim(self.stream(task.kind), GROUP, consumer, 0, [task.entry_id], justid=True)

    def complete(self, task: Task, result: dict[str, Any]) -> bool:
        """Record the task's result (first writer wins) and acknowledge it. True if this result was kept."""
        pipe = self.r.pipeline(transaction=True)
        pipe.set(self._result(task.task_id), json.dumps(result, sort_keys=True), nx=True)
        pipe.xack(self.stream(task.kind), GROUP, task.entry_id)
        pipe.xdel(self.stream(task.kind), task.entry_id)
        pipe.hdel(self._attempts(task.kind), task.task_id)
        kept = pipe.execute()[0]
        self._inherit_ttl(task.payload, [self._result(task.task_id)])
        return bool(kept)

    def fail(self, task: Task, error: str, final: bool = False) -> None:
        """A handler error: retry right away (as a fresh entry) or, out of attempts or `final` (no
        attempt can succeed), dead-letter it."""
        if final or task.attempt >= self.max_attempts:
            self._dead_letter(task.kind, task.entry_id, task.task_id, task.payload, error)
            return
        self._requeue(task).execute()

    def defer(self, task: Task) -> None:
        """Not yet (e.g. a shared service is busy): back to the end of the stream, the attempt not spent."""
        self._requeue(task).hincrby(self._attempts(task.kind), task.task_id, -1).execute()

    def _requeue(self, task: Task) -> redis.client.Pipeline:
        """A transaction that moves the task to a fresh entry at the end of its stream (not yet executed)."""
        pipe = self.r.pipeline(transaction=True)
        pipe.xadd(self.stream(task.kind), {"task_id": task.task_id, "payload": json.dumps(task.payload, sort_keys=True)})
        pipe.xack(self.stream(task.kind), GROUP, task.entry_id)
        pipe.xdel(self.stream(task.kind), task.entry_id)
        return pipe

    def _dead_letter(self, kind: str, entry_id: str, task_id: str, payload: dict, error: str) -> None:
        pipe = self.r.pipeline(transaction=True)
        pipe.xadd(self.dead_stream(kind), {"task_id": task_id, "payload": json.dumps(payload, sort_keys=True),
                                           "error": error[:2000]}, maxlen=MAX_DEAD, approximate=True)
        pipe.xack(self.stream(kind), GROUP, entry_id)
        pipe.xdel(self.stream(kind), entry_id)
        pipe.hdel(self._attempts(kind), task_id)
        pipe.set(self._failed(task_id), error[:2000])
        pipe.execute()
        self._inherit_ttl(payload, [self._failed(task_id)])

    def _ack(self, kind: str, entry_id: Any) -> None:
        pipe = self.r.pipeline(transaction=True)
        pipe.xack(self.stream(kind), GROUP, entry_id)
        pipe.xdel(self.stream(kind), entry_id)
        pipe.execute()

    # ------------------------------------------------------------ retention
    def expire_job(self, job: str, ttl_s: float) -> None:
        """A finished job: its tasks' markers, results and errors expire in `ttl_s` seconds.

        The set of its task ids gets its TTL first, so that a result written
        meanwhile either sees it (and inherits it) or is seen here.
        """
        ttl = max(1, int(ttl_s))
        tasks_key = self._job_tasks(job)
        if not self.r.expire(tasks_key, ttl):
            return  # no task was ever submitted for it (or it is gone already)
        task_ids = [_s(t) for t in self.r.smembers(tasks_key)]
        for i in range(0, len(task_ids), 500):
            with self.r.pipeline(transaction=False) as pipe:
                for task_id in task_ids[i:i + 500]:
                    for key in (self._submitted(task_id), self._result(task_id), self._failed(task_id)):
                        pipe.expire(key, ttl)
                pipe.execute()

    def _inherit_ttl(self, payload: dict[str, Any], keys: list[str]) -> None:
        """Keys written for a job that has finished already expire with the job's other keys."""
        job = payload.get("job")
        if not isinstance(job, str):
            return
        ttl = self.r.ttl(self._job_tasks(job))
        if ttl > 0:
            with self.r.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.expire(key, ttl)
                pipe.execute()

    def resubmit(self, kind: str, task_id: str, payload: dict[str, Any]) -> bool:
        """Run a finished task again (its stored output was found unreadable): its result, error and
        submit markers are dropped and it is enqueued afresh. False if it is already waiting to run
        again (submitted, no result yet), so that asking twice enqueues it once."""
        if self.r.exists(self._submitted(task_id)) and not self.r.exists(self._result(task_id)) \
                and not self.r.exists(self._failed(task_id)):
            return False
        self.r.delete(self._result(task_id), self._failed(task_id), self._submitted(task_id))
        return self.submit(kind, task_id, payload)

    def retry_failed(self, job: str) -> int:
        """Forget the dead-lettered tasks of `job` (their errors and submit markers), so that the
        controller's next submit of each enqueues it again; and keep the job's tasks' state for good
        (the job is running again: no retention expiry). Returns how many tasks will run again."""
        tasks_key = self._job_tasks(job)
        task_ids = [_s(t) for t in self.r.smembers(tasks_key)]
        failed = [t for t, raw in zip(task_ids, self.r.mget([self._failed(t) for t in task_ids]) if task_ids else [])
                  if raw is not None]
        with self.r.pipeline(transaction=True) as pipe:
            for task_id in failed:
                pipe.delete(self._failed(task_id), self._submitted(task_id))
            pipe.persist(tasks_key)
            for task_id in task_ids:
                for key in (self._submitted(task_id), self._result(task_id)):
                    pipe.persist(key)
            pipe.execute()
        return len(failed)

    def failure(self, task_id: str) -> str | None:
        """The error of a dead-lettered task, or None."""
        raw = self.r.get(self._failed(task_id))
        return None if raw is None else raw.decode()

    def outcomes(self, task_ids: list[str]) -> tuple[dict[str, str], dict[str, dict[str, Any]]]:
        """The errors of the dead-lettered ones and the results of the finished ones, in one round trip."""
        if not task_ids:
            return {}, {}
        with self.r.pipeline(transaction=False) as pipe:
            pipe.mget([self._failed(t) for t in task_ids])
            pipe.mget([self._result(t) for t in task_ids])
            failed, done = pipe.execute()
        failures = {t: raw.decode() for t, raw in zip(task_ids, failed) if raw is not None}
        results = {t: json.loads(raw) for t, raw in zip(task_ids, done) if raw is not None}
        return failures, results

    # --------------------------------------------------------------- reads
    def result(self, task_id: str) -> dict[str, Any] | None:
        raw = self.r.get(self._result(task_id))
        return None if raw is None else json.loads(raw)

    def wait(self, task_ids: Iterable[str], timeout_s: float | None = None, poll_s: float = 0.05) -> dict[str, dict]:
        """Block until every task has a result; raise TimeoutError naming the missing ones."""
        pending = list(task_ids)
        results: dict[str, dict] = {}
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while pending:
            values = self.r.mget([self._result(t) for t in pending])
            for task_id, raw in zip(list(pending), values):
                if raw is not None:
                    results[task_id] = json.loads(raw)
                    pending.remove(task_id)
            if pending:
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"no result yet for {len(pending)} task(s), e.g. {pending[:3]}")
                time.sleep(poll_s)
        return results

    def dead_letters(self, kind: str) -> list[dict[str, str]]:
        return [{_s(k): _s(v) for k, v in fields.items()} for _, fields in self.r.xrange(self.dead_stream(kind))]

    def depth(self, kind: str) -> dict[str, int]:
        """Waiting (not yet delivered) and pending (delivered, unacknowledged) task counts."""
        self._ensure_group(kind)
        info = next(g for g in self.r.xinfo_groups(self.stream(kind)) if _s(g["name"]) == GROUP)
        lag = info.get("lag")
        pending = int(info["pending"])
        if lag is None:  # Redis < 7 has no lag: count entries after the group's last delivered id
            last = _s(info["last-delivered-id"])
            lag = len(self.r.xrange(self.stream(kind), min=f"({last}" if last != "0-0" else "-"))
        return {"waiting": int(lag), "pending": pending}


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
