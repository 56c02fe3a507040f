"""Job records in Redis (docs/design.md §6): one hash per job with its current
phase, and one event stream per job that `cropi logs --follow` reads.

    <p>:job:<name>      hash: name, phase, stage, step, status, spec, created, updated, error, cancel
    <p>:jobs            sorted set of job names by creation time
    <p>:active          set of the jobs not yet in a terminal phase (what the stage machine reads each tick)
    <p>:active:built    marker: <p>:active was built from <p>:jobs (a Redis written by an older cropi lacks it)
    <p>:events:<name>   stream of {kind, message, data}, trimmed to about MAX_EVENTS entries
    <p>:steps:<name>    hash step -> times that step was completed (must stay 1)

Bounded: a job that reaches a terminal phase leaves <p>:active, and with a
retention period (the controller's, `CROPI_JOB_RETENTION_S`, 7 days by
default) its hash, events and step counts expire that long after it ended.
A write for a job whose record is gone (expired, or never created) is
dropped rather than re-creating a partial record without expiry.

Fenced writes (`JobRegistry.fenced(token)`, the stage machine's while it holds
the controller lease, cropi/runtime/lease.py): a job's record, events and the
active set are written only if the token is still the current value of
<p>:controller:fence, checked in the same Lua script; otherwise `LeaseLost`.
"""

from __future__ import annotations

import copy
import json
import os
import time
from enum import StrEnum
from typing import Any

import redis

from cropi.errors import InputError
from cropi.runtime.lease import LeaseLost, fence_key


class Phase(StrEnum):
    """A job's phase in its record: queued -> offline -> [project -> select -> train] per stage -> done."""

    QUEUED = "queued"
    OFFLINE = "offline"
    PROJECT = "project"
    SELECT = "select"
    TRAIN = "train"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL = frozenset({Phase.DONE, Phase.FAILED, Phase.CANCELLED})
MAX_EVENTS = 10_000
DEFAULT_RETENTION_S = 7 * 24 * 3600
RETENTION_ENV = "CROPI_JOB_RETENTION_S"

# A fenced write (ARGV[1] a token, '' for none) whose token is not the fence's current value: -1.
_FENCE = "if ARGV[1] ~= '' and redis.call('GET', KEYS[#KEYS]) ~= ARGV[1] then return -1 end\n"
# KEYS: job hash, active set, events, steps, fence. ARGV: fence token, job name, phase change (0: none,
# 1: to a terminal phase, 2: to a running one), ttl s (0: none), field, value, ...
_HSET_EXISTING = _FENCE + """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 5))
if ARGV[3] == '1' then
  redis.call('SREM', KEYS[2], ARGV[2])
  local ttl = tonumber(ARGV[4])
  if ttl > 0 then
    redis.call('EXPIRE', KEYS[1], ttl)
    redis.call('EXPIRE', KEYS[3], ttl)
    redis.call('EXPIRE', KEYS[4], ttl)
  end
elseif ARGV[3] == '2' then
  redis.call('SADD', KEYS[2], ARGV[2])
  redis.call('PERSIST', KEYS[1])
  redis.call('PERSIST', KEYS[3])
  redis.call('PERSIST', KEYS[4])
end
return 1
"""
# KEYS: job hash, events, fence. ARGV: fence token, maxlen, field, value, ...  The stream inherits the
# TTL XADD keeps.
_XADD_EXISTING = _FENCE + """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
return redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', unpack(ARGV, 3))
"""
# KEYS: active set, fence. ARGV: fence token, job name.
_SREM_ACTIVE = _FENCE + "return redis.call('SREM', KEYS[1], ARGV[2])"
# KEYS: job hash, steps. ARGV: step. A steps hash created after the job ended gets the job's remaining TTL.
_COUNT_STEP = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local n = redis.call('HINCRBY', KEYS[2], ARGV[1], 1)
local ttl = redis.call('TTL', KEYS[1])
if ttl > 0 then redis.call('EXPIRE', KEYS[2], ttl) end
return n
"""

_U64 = (1 << 64) - 1


def retention_from_env(default: float = DEFAULT_RETENTION_S) -> float | None:
    """`CROPI_JOB_RETENTION_S`: seconds a finished job's Redis state is kept (0: forever)."""
    raw = os.environ.get(RETENTION_ENV, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise InputError(f"{RETENTION_ENV}: not a number of seconds") from None
    if not value >= 0 or value == float("inf"):
        raise InputError(f"{RETENTION_ENV}: must be 0 (keep forever) or a positive number of seconds")
    return value or None


def parse_event_id(value: str, what: str = "after") -> str:
    """A stream entry id `<ms>-<seq>` Redis accepts (both parts below 2**64); InputError naming `what`, not the value."""
    ms, sep, seq = value.partition("-")
    if not (sep and ms.isascii() and seq.isascii() and ms.isdigit() and seq.isdigit()
            and len(ms) <= 20 and len(seq) <= 20 and int(ms) <= _U64 and int(seq) <= _U64):
        raise InputError(f"{what}: not an event id (<milliseconds>-<sequence>, each below 2**64)")
    return f"{int(ms)}-{int(seq)}"


class JobConflict(Exception):
    """A job of that name exists with a different spec."""


class JobRegistry:
    def __init__(self, client: redis.Redis, prefix: str = "cropi", retention_s: float | None = None):
        self.r = client
        self.prefix = prefix
        # Seconds a job's hash, events and step counts live on after it ended; None: forever (`cropi run`).
        self.retention_s = retention_s
        self._active_built = False
        self.fence = ""  # the token this registry's stage-machine writes carry ('': unfenced); see fenced()
        self._hset_existing = client.register_script(_HSET_EXISTING)
        self._xadd_existing = client.register_script(_XADD_EXISTING)
        self._srem_active = client.register_script(_SREM_ACTIVE)
        self._count_step = client.register_script(_COUNT_STEP)

    def fenced(self, token: int) -> JobRegistry:
        """A view of this registry (same client) whose writes to a job's record and events and to the
        active set are refused with LeaseLost once `token` is no longer the controller lease's fence.
        Submissions (`create`) and cancel requests are never fenced: any replica takes them."""
        view = copy.copy(self)
        view.fence = str(int(token))
        return view

    def _refused(self, reply: Any, job: str) -> bool:
        if reply == -1:
            raise LeaseLost(f"job {job}: write refused, fencing token {self.fence} is stale "
                            "(another controller took the lease)")
        return False

    def _key(self, job: str) -> str:
        return f"{self.prefix}:job:{job}"

    def _events(self, job: str) -> str:
        return f"{self.prefix}:events:{job}"

    def _steps(self, job: str) -> str:
        return f"{self.prefix}:steps:{job}"

    @property
    def _active(self) -> str:
        return f"{self.prefix}:active"

    def create(self, job: str, spec_yaml: str) -> bool:
        """Register a job; True if new, False if the same spec was submitted before (idempotent)."""
        key = self._key(job)
        with self.r.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(key)
                    existing = pipe.hget(key, "spec")
                    if existing is not None:
                        pipe.reset()
                        if existing.decode() != spec_yaml:
                            raise JobConflict(f"job {job!r} exists with a different spec; choose another name")
                        return False
                    now = time.time()
                    pipe.multi()
                    pipe.hset(key, mapping={"name": job, "phase": Phase.QUEUED, "status": "queued", "stage": 0,
                                            "step": 0, "spec": spec_yaml, "created": now, "updated": now,
                                            "error": "", "cancel": 0})
                    pipe.zadd(f"{self.prefix}:jobs", {job: now})
                    pipe.sadd(self._active, job)
                    pipe.execute()
                    break
                except redis.WatchError:
                    continue
        self._append(job, "submitted", f"job {job} submitted", {}, fenced=False)
        return True

    def get(self, job: str) -> dict[str, Any] | None:
        raw = self.r.hgetall(self._key(job))
        return _record(raw)

    def names(self) -> list[str]:
        """Every job Redis still knows, oldest first (names whose record expired are dropped here)."""
        return [rec["name"] for rec in self.records()]

    def records(self) -> list[dict[str, Any]]:
        """Every job's record, oldest first, in one round trip; prunes the names of expired records."""
        names = [n.decode() for n in self.r.zrange(f"{self.prefix}:jobs", 0, -1)]
        if not names:
            return []
        with self.r.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.hgetall(self._key(name))
            raws = pipe.execute()
        out, gone = [], []
        for name, raw in zip(names, raws):
            rec = _record(raw)
            if rec is None:
                gone.append(name)
            else:
                out.append(rec)
        if gone:
            self._prune(gone)
        return out

    def _prune(self, names: list[str]) -> None:
        """Forget names whose record expired (re-checked: one may have been re-created meanwhile)."""
        for name in names:
            with self.r.pipeline(transaction=True) as pipe:
                try:
                    pipe.watch(self._key(name))
                    if pipe.exists(self._key(name)):
                        pipe.reset()
                        continue
                    pipe.multi()
                    pipe.zrem(f"{self.prefix}:jobs", name)
                    pipe.srem(self._active, name)
                    pipe.execute()
                except redis.WatchError:
                    continue

    def active(self) -> list[str]:
        """The jobs not yet in a terminal phase, oldest first: one read while nothing runs."""
        if not self._active_built:
            self._build_active()
        names = [n.decode() for n in self.r.smembers(self._active)]
        if len(names) < 2:
            return names
        scores = self.r.zmscore(f"{self.prefix}:jobs", names)
        return [n for _, n in sorted(zip((s or 0.0 for s in scores), names))]

    def forget_active(self, job: str) -> None:
        """Drop `job` from the active set (its record ended or is gone)."""
        self._refused(self._srem_active(keys=[self._active, fence_key(self.prefix)], args=[self.fence, job]), job)

    def reset_active(self) -> None:
        """Redis was away (maybe restored from an older file): check the active set is there on next use."""
        self._active_built = False

    def _build_active(self) -> None:
        """Once per Redis: fill <p>:active from every job's phase (a Redis an older cropi wrote)."""
        marker = f"{self.prefix}:active:built"
        if not self.r.exists(marker):
            names = [n.decode() for n in self.r.zrange(f"{self.prefix}:jobs", 0, -1)]
            with self.r.pipeline(transaction=False) as pipe:
                for name in names:
                    pipe.hget(self._key(name), "phase")
                phases = pipe.execute() if names else []
            running = [n for n, p in zip(names, phases) if p is not None and p.decode() not in TERMINAL]
            with self.r.pipeline(transaction=True) as pipe:
                if running:
                    pipe.sadd(self._active, *running)
                pipe.set(marker, "1")
                pipe.execute()
        self._active_built = True

    def update(self, job: str, **fields: Any) -> None:
        """Set fields of an existing job's record (a no-op if it is gone). A terminal `phase` takes the
        job out of the active set and, with a retention period, starts its expiry; a running one (a
        job continued after it failed) puts it back and stops the expiry."""
        values = {k: (json.dumps(v) if isinstance(v, (dict, list)) else v) for k, v in fields.items()}
        values["updated"] = time.time()
        change = 0 if "phase" not in fields else 1 if fields["phase"] in TERMINAL else 2
        self._hset(job, values, change)

    def _hset(self, job: str, values: dict[str, Any], change: int = 0, fenced: bool = True) -> bool:
        ttl = 0
        if change == 1 and self.retention_s:
            ttl = max(1, int(self.retention_s))
        args: list[Any] = [self.fence if fenced else "", job, change, ttl]
        for k, v in values.items():
            args += [k, v]
        keys = [self._key(job), self._active, self._events(job), self._steps(job), fence_key(self.prefix)]
        reply = self._hset_existing(keys=keys, args=args)
        return not self._refused(reply, job) and bool(reply)

    def request_cancel(self, job: str) -> None:
        if self._hset(job, {"cancel": 1}, fenced=False):
            self._append(job, "cancel_requested", "cancel requested", {}, fenced=False)

    def cancel_requested(self, job: str) -> bool:
        return (self.r.hget(self._key(job), "cancel") or b"0") == b"1"

    def ttl(self, job: str) -> float | None:
        """Seconds until the job's record expires; None if it does not (or is gone)."""
        ms = self.r.pttl(self._key(job))
        return ms / 1000 if ms >= 0 else None

    def event(self, job: str, kind: str, message: str, **data: Any) -> None:
        """Append an event to the job's stream (dropped if the job's record is gone)."""
        self._append(job, kind, message, data)

    def _append(self, job: str, kind: str, message: str, data: dict[str, Any], fenced: bool = True) -> None:
        fields = {"kind": kind, "message": message, "data": json.dumps(data), "time": time.time()}
        args: list[Any] = [self.fence if fenced else "", MAX_EVENTS]
        for k, v in fields.items():
            args += [k, v]
        self._refused(self._xadd_existing(keys=[self._key(job), self._events(job), fence_key(self.prefix)],
                                          args=args), job)

    def events(self, job: str, after: str = "0-0", block_ms: int | None = None,
               count: int = 500) -> list[dict[str, Any]]:
        if block_ms is None:
            if after == f"{_U64}-{_U64}":  # nothing can follow the last id (and Redis refuses "(max")
                return []
            entries = self.r.xrange(self._events(job), min=f"({after}" if after != "0-0" else "-", count=count)
        else:
            reply = self.r.xread({self._events(job): after}, count=count, block=block_ms)
            entries = reply[0][1] if reply else []
        return [_event(entry_id, fields) for entry_id, fields in entries]

    def wait_events(self, job: str, after: str, wait_ms: int, count: int = 500) -> list[dict[str, Any]]:
        """Events after `after`, waiting up to `wait_ms` for one: never longer, whatever Redis does.

        The client's socket timeout must be above `wait_ms` (the controller's long-poll client is);
        a connection lost meanwhile is retried only while the deadline allows.
        """
        deadline = time.monotonic() + wait_ms / 1000
        while True:
            remaining = int((deadline - time.monotonic()) * 1000)
            if remaining <= 0:
                return []
            try:
                return self.events(job, after=after, block_ms=remaining, count=count)
            except (redis.ConnectionError, redis.TimeoutError):
                if deadline - time.monotonic() < 0.5:
                    raise
                time.sleep(0.25)

    def count_step(self, job: str, step: int) -> int:
        return int(self._count_step(keys=[self._key(job), self._steps(job)], args=[str(step)]))

    def step_counts(self, job: str) -> dict[int, int]:
        return {int(k): int(v) for k, v in self.r.hgetall(self._steps(job)).items()}


def _record(raw: dict) -> dict[str, Any] | None:
    rec: dict[str, Any] = {k.decode(): v.decode() for k, v in raw.items()}
    if "spec" not in rec or "name" not in rec:  # gone, or a fragment written after it expired
        return None
    for field in ("stage", "step", "cancel"):
        rec[field] = int(rec.get(field) or 0)
    for field in ("created", "updated"):
        rec[field] = float(rec.get(field) or 0)
    rec["metrics"] = json.loads(rec.get("metrics") or "{}")
    return rec


def _event(entry_id: bytes, fields: dict) -> dict[str, Any]:
    rec = {k.decode(): v.decode() for k, v in fields.items()}
    return {"id": entry_id.decode(), "kind": rec["kind"], "message": rec["message"],
            "time": float(rec["time"]), "data": json.loads(rec["data"])}
