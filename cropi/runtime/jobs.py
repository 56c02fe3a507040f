"""Job records in Redis (docs/design.md §6): one hash per job with its current
phase, and one event stream per job that `cropi logs --follow` reads.

    <p>:job:<name>      hash: name, phase, stage, step, status, spec, created, updated, error, cancel
    <p>:jobs            sorted set of job names by creation time
    <p>:events:<name>   stream of {kind, message, data}
    <p>:steps:<name>    hash step -> times that step was completed (must stay 1)
"""

from __future__ import annotations

import json
import time
from enum import StrEnum
from typing import Any

import redis

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


class JobConflict(Exception):
    """A job of that name exists with a different spec."""


class JobRegistry:
    def __init__(self, client: redis.Redis, prefix: str = "cropi"):
        self.r = client
        self.prefix = prefix

    def _key(self, job: str) -> str:
        return f"{self.prefix}:job:{job}"

    def _events(self, job: str) -> str:
        return f"{self.prefix}:events:{job}"

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
                    pipe.execute()
                    break
                except redis.WatchError:
                    continue
        self.event(job, "submitted", f"job {job} submitted")
        return True

    def get(self, job: str) -> dict[str, Any] | None:
        raw = self.r.hgetall(self._key(job))
        if not raw:
            return None
        rec: dict[str, Any] = {k.decode(): v.decode() for k, v in raw.items()}
        for field in ("stage", "step", "cancel"):
            rec[field] = int(rec.get(field) or 0)
        for field in ("created", "updated"):
            rec[field] = float(rec.get(field) or 0)
        rec["metrics"] = json.loads(rec.get("metrics") or "{}")
        return rec

    def names(self) -> list[str]:
        return [n.decode() for n in self.r.zrange(f"{self.prefix}:jobs", 0, -1)]

    def update(self, job: str, **fields: Any) -> None:
        values = {k: (json.dumps(v) if isinstance(v, (dict, list)) else v) for k, v in fields.items()}
        values["updated"] = time.time()
        self.r.hset(self._key(job), mapping=values)

    def request_cancel(self, job: str) -> None:
        self.r.hset(self._key(job), "cancel", 1)
        self.event(job, "cancel_requested", "cancel requested")

    def cancel_requested(self, job: str) -> bool:
        return (self.r.hget(self._key(job), "cancel") or b"0") == b"1"

    def event(self, job: str, kind: str, message: str, **data: Any) -> None:
        self.r.xadd(self._events(job), {"kind": kind, "message": message, "data": json.dumps(data),
                                        "time": time.time()}, maxlen=MAX_EVENTS, approximate=True)

    def events(self, job: str, after: str = "0-0", block_ms: int | None = None,
               count: int = 500) -> list[dict[str, Any]]:
        if block_ms is None:
            entries = self.r.xrange(self._events(job), min=f"({after}" if after != "0-0" else "-", count=count)
        else:
            reply = self.r.xread({self._events(job): after}, count=count, block=block_ms)
            entries = reply[0][1] if reply else []
        out = []
        for entry_id, fields in entries:
            rec = {k.decode(): v.decode() for k, v in fields.items()}
            out.append({"id": entry_id.decode(), "kind": rec["kind"], "message": rec["message"],
                        "time": float(rec["time"]), "data": json.loads(rec["data"])})
        return out

    def count_step(self, job: str, step: int) -> int:
        return int(self.r.hincrby(f"{self.prefix}:steps:{job}", str(step), 1))

    def step_counts(self, job: str) -> dict[int, int]:
        return {int(k): int(v) for k, v in self.r.hgetall(f"{self.prefix}:steps:{job}").items()}
