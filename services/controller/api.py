"""The controller service: HTTP API (FastAPI) + the stage machine loop.

    POST /v1/jobs                    submit {"spec": "<YAML>"} -> 201 (200 if the same spec was submitted before);
                                     a new job is checked as `cropi run` checks it (model, data, templates): 422
    GET  /v1/jobs                    list
    GET  /v1/jobs/{name}             status
    POST /v1/jobs/{name}/cancel      cancel
    POST /v1/jobs/{name}/resume      continue a failed job from the start of the stage it failed in
    GET  /v1/jobs/{name}/events      events after ?after=<id>, optionally waiting ?wait_ms=
    GET  /healthz, GET /metrics      liveness (no auth), Prometheus metrics (no auth)

Every /v1 route needs `Authorization: Bearer <token>`; the token names its
tenant (tenancy.py), and a tenant sees, follows and cancels only its own
jobs. The operator's token acts for the tenant named in `X-Cropi-Tenant` (its
object's namespace). The OpenAPI spec is at /openapi.json; there are no
/docs pages. /metrics needs no token, for Prometheus: it carries queue depths
and each job's stage, step and evaluation summary under its tenant and name,
and the chart's NetworkPolicy admits only `metrics.scrapeFrom` to it.

Limits: the token is checked before any byte of a request body is read
(401); a body is read in pieces and refused with 413 as soon as it passes
1 MiB, chunked or not. An events long-poll (`wait_ms`, at most 30000) answers
by its deadline, on its own bounded pool of threads and Redis connections
(64 by default, CROPI_LONG_POLL_SLOTS; past them 429 with Retry-After), so
that long-polls never delay /healthz or the other routes. An event id Redis
cannot take (a part of 2**64 or more) is a 400 naming the parameter; no
refusal repeats the value it refuses.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Gauge,
    generate_latest,
)
from pydantic import BaseModel, Field

from cropi.curriculum.controller import RETRY_DELAYS_S, Controller, cached_job_data, check_job
from cropi.curriculum.data_loader import JobDataLoader
from cropi.errors import InputError
from cropi.runtime.jobs import (
    DEFAULT_RETENTION_S,
    TERMINAL,
    JobConflict,
    JobRegistry,
    parse_event_id,
    retention_from_env,
)
from cropi.runtime.queue import TaskBus
from cropi.runtime.store import ObjectStore
from cropi.runtime.tasks import TaskKind
from cropi.spec import parse_spec_yaml
from services.controller.artifacts import add_artifact_routes
from services.controller.guard import (
    MAX_BODY_BYTES,
    MAX_WAIT_MS,
    UNAUTHORIZED,
    RequestGuard,
    long_poll_client,
)
from services.controller.stage_loop import StageLoop
from services.controller.tenancy import TENANT_HEADER, Tenants, is_label, job_key, split_job_key

log = logging.getLogger(__name__)

LONG_POLL_SLOTS = 64  # long-polls open at once (each holds a thread and a Redis connection); more: 429
LONG_POLL_SLOTS_ENV = "CROPI_LONG_POLL_SLOTS"


class SubmitRequest(BaseModel):
    spec: str = Field(..., description="the job spec as YAML text", max_length=MAX_BODY_BYTES)


class JobStatus(BaseModel):
    name: str
    phase: str
    status: str
    stage: int
    step: int
    created: float
    updated: float
    error: str = ""
    metrics: dict[str, float] = {}
    stages: int = 0
    total_steps: int = 0


_SHAPES: OrderedDict[bytes, tuple[int, int]] = OrderedDict()
_SHAPES_LOCK = threading.Lock()


def _shape(spec_yaml: str) -> tuple[int, int]:
    # Parsing a spec costs milliseconds; status requests are many and specs never change. Cached by
    # digest, so that the cache holds two ints per spec, not the spec text (up to a MiB each).
    digest = hashlib.sha256(spec_yaml.encode()).digest()
    with _SHAPES_LOCK:
        if digest in _SHAPES:
            _SHAPES.move_to_end(digest)
            return _SHAPES[digest]
    spec = parse_spec_yaml(spec_yaml)
    shape = (spec.curriculum.stages, spec.total_steps)
    with _SHAPES_LOCK:
        _SHAPES[digest] = shape
        while len(_SHAPES) > 1024:
            _SHAPES.popitem(last=False)
    return shape


def _status(rec: dict[str, Any]) -> JobStatus:
    stages, total_steps = _shape(rec["spec"])
    return JobStatus(**{k: rec[k] for k in ("phase", "status", "stage", "step", "created", "updated",
                                             "error", "metrics")},
                     name=split_job_key(rec["name"])[1], stages=stages, total_steps=total_steps)


def create_app(bus: TaskBus, jobs: JobRegistry, store: ObjectStore, token: str | Tenants,
               run_loop: bool = True, tick_s: float = 0.2, retention_s: float | None = DEFAULT_RETENTION_S,
               long_poll_slots: int = LONG_POLL_SLOTS) -> FastAPI:
    """The controller app. `token`: the default tenant's token, or every tenant's (Tenants);
    `retention_s`: how long an ended job's Redis state is kept (None: forever)."""
    tenants = token if isinstance(token, Tenants) else Tenants.single(token)
    if long_poll_slots < 1:
        raise InputError(f"{LONG_POLL_SLOTS_ENV}: must be at least 1")
    loader = JobDataLoader(cached_job_data)
    controller = Controller(bus, jobs, store, retention_s=retention_s, loader=loader, retry_delays_s=RETRY_DELAYS_S)
    # Long-polls: their own threads, Redis connections and registry; a slot is freed when the wait
    # ends (not when its client goes away), so that the threads never outnumber the slots.
    waiters = JobRegistry(long_poll_client(bus.r, long_poll_slots), prefix=jobs.prefix)
    wait_pool = ThreadPoolExecutor(long_poll_slots, thread_name_prefix="long-poll")
    wait_slots = threading.BoundedSemaphore(long_poll_slots)
    health_pool = ThreadPoolExecutor(1, thread_name_prefix="healthz")

    stage_loop = StageLoop.leased(controller, tick_s=tick_s)  # only the lease holder of the replicas ticks

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        if run_loop:
            stage_loop.start()
        yield
        stage_loop.stop()
        loader.close()
        wait_pool.shutdown(wait=False, cancel_futures=True)
        health_pool.shutdown(wait=False, cancel_futures=True)

    # No /docs or /redoc pages: they would be the only HTML the controller serves, to anyone;
    # /openapi.json stays (it is docs/openapi.json, public anyway).
    app = FastAPI(title="cropi controller", version="1", description=__doc__, lifespan=lifespan,
                  docs_url=None, redoc_url=None)
    bearer = HTTPBearer(auto_error=False)

    def tenant(cred: HTTPAuthorizationCredentials | None = Depends(bearer),
               named: str | None = Header(None, alias=TENANT_HEADER,
                                          description="the operator's token only: the tenant it acts for")) -> str:
        """The tenant a request acts for. RequestGuard refused unknown tokens before reading a body;
        this keeps each route safe on its own (and puts the scheme in the OpenAPI spec)."""
        who = tenants.identify(f"Bearer {cred.credentials}" if cred else None)
        if who is None:
            raise HTTPException(401, UNAUTHORIZED, headers={"WWW-Authenticate": "Bearer"})
        try:
            return tenants.tenant_of(who, named)
        except InputError as err:
            raise HTTPException(403, str(err)) from None

    app.add_middleware(RequestGuard, identify=tenants.identify, limit=MAX_BODY_BYTES)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's answer names each field and repeats its value ("input"): keep the names only.
        errors = [{k: v for k, v in e.items() if k not in ("input", "url")} for e in exc.errors()]
        return JSONResponse({"detail": jsonable_encoder(errors)}, status_code=422)

    def record_or_404(owner: str, name: str, registry: JobRegistry = jobs) -> tuple[str, dict[str, Any]]:
        """The key and record of the tenant's job `name`; 404 if it has none of that name (another
        tenant's job of that name is as absent as one that never was)."""
        key = job_key(owner, name)
        rec = registry.get(key) if is_label(name) else None
        if rec is None:
            raise HTTPException(404, f"no job named {name!r}" if is_label(name) else "no job of that name")
        return key, rec

    def key_or_404(owner: str, name: str, registry: JobRegistry = jobs) -> str:
        return record_or_404(owner, name, registry)[0]

    @app.post("/v1/jobs", status_code=201, response_model=JobStatus, responses={
        409: {"description": "a job of that name exists with another spec"},
        422: {"description": "the spec, its data or its model is not valid"}})
    def submit(body: SubmitRequest, response: Response, owner: str = Depends(tenant)) -> JobStatus:
        try:
            spec = parse_spec_yaml(body.spec, "request body 'spec'")
            if not is_label(spec.name):
                raise InputError("invalid job spec (request body 'spec'): name: must be a DNS label: lowercase "
                                 "letters, digits and '-', 1-63 chars")
            spec = spec.model_copy(update={"name": job_key(owner, spec.name)})
            if jobs.get(spec.name) is None:  # new: what `cropi run` checks before it starts, checked now
                check_job(spec)
        except InputError as err:
            raise HTTPException(422, str(err)) from None
        try:
            created = controller.submit(spec)
        except JobConflict as err:
            raise HTTPException(409, str(err)) from None
        if not created:
            response.status_code = 200
        return _status(jobs.get(spec.name))

    @app.get("/v1/jobs", response_model=list[JobStatus])
    def list_jobs(owner: str = Depends(tenant)) -> list[JobStatus]:
        return [_status(rec) for rec in jobs.records() if split_job_key(rec["name"])[0] == owner]

    @app.get("/v1/jobs/{name}", response_model=JobStatus)
    def get_job(name: str, owner: str = Depends(tenant)) -> JobStatus:
        return _status(record_or_404(owner, name)[1])

    @app.post("/v1/jobs/{name}/cancel", status_code=202, response_model=JobStatus)
    def cancel(name: str, owner: str = Depends(tenant)) -> JobStatus:
        key, rec = record_or_404(owner, name)
        if rec["phase"] not in TERMINAL:
            jobs.request_cancel(key)
        return _status(jobs.get(key))

    @app.post("/v1/jobs/{name}/resume", status_code=202, response_model=JobStatus, responses={
        409: {"description": "the job has not failed (only a failed job continues)"}})
    def resume(name: str, owner: str = Depends(tenant)) -> JobStatus:
        """Continue a failed job from the start of the stage it failed in (nothing stored is redone)."""
        key = key_or_404(owner, name)
        try:
            controller.reopen(key)
        except JobConflict:
            raise HTTPException(409, f"job {name!r} is {jobs.get(key)['phase']}; only a failed job continues") from None
        return _status(jobs.get(key))

    def events_now(owner: str, name: str, after: str) -> list[dict[str, Any]]:
        return jobs.events(key_or_404(owner, name), after=after)

    def events_waited(owner: str, name: str, after: str, wait_ms: int) -> list[dict[str, Any]]:
        return waiters.wait_events(key_or_404(owner, name, waiters), after, wait_ms)

    @app.get("/v1/jobs/{name}/events", responses={
        400: {"description": "`after` is not an event id Redis can take"},
        404: {"description": "no job of that name"},
        429: {"description": "every long-poll slot is taken: retry after Retry-After seconds"}})
    async def events(name: str, after: str = Query("0-0", pattern=r"^\d+-\d+$"),
                     wait_ms: int = Query(0, ge=0, le=MAX_WAIT_MS),
                     owner: str = Depends(tenant)) -> list[dict[str, Any]]:
        try:
            after = parse_event_id(after, "query parameter 'after'")
        except InputError as err:
            raise HTTPException(400, str(err)) from None
        if not wait_ms:
            return await run_in_threadpool(events_now, owner, name, after)
        if not wait_slots.acquire(blocking=False):
            raise HTTPException(429, f"all {long_poll_slots} long-polls are open; retry shortly",
                                headers={"Retry-After": "1"})
        try:
            future = wait_pool.submit(events_waited, owner, name, after, wait_ms)
        except BaseException:
            wait_slots.release()
            raise
        # Freed when the wait ends or is cancelled before it began, not when the client goes away.
        future.add_done_callback(lambda _f: wait_slots.release())
        return await asyncio.wrap_future(future)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        # Its own thread: a full request pool (slow clients, a burst of requests) does not fail the probe.
        await asyncio.get_running_loop().run_in_executor(health_pool, bus.r.ping)
        return {"status": "ok"}

    @app.get("/metrics")
    def metrics() -> Response:
        registry = CollectorRegistry()
        depth = Gauge("cropi_queue_depth", "tasks per kind and state", ["kind", "state"], registry=registry)
        for kind in TaskKind:
            for state, n in bus.depth(kind).items():
                depth.labels(kind, state).set(n)
        stage = Gauge("cropi_job_stage", "current stage", ["tenant", "job"], registry=registry)
        step = Gauge("cropi_job_step", "completed training steps", ["tenant", "job"], registry=registry)
        acc = Gauge("cropi_job_metric", "latest evaluation summary", ["tenant", "job", "metric"], registry=registry)
        for rec in jobs.records():
            owner, name = split_job_key(rec["name"])
            stage.labels(owner, name).set(rec["stage"])
            step.labels(owner, name).set(rec["step"])
            for key, value in rec["metrics"].items():
                acc.labels(owner, name, key).set(value)
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    add_artifact_routes(app, store, jobs, tenant, key_or_404)
    app.state.controller = controller
    return app


def serve(host: str, port: int, bus: TaskBus, jobs: JobRegistry, store: ObjectStore, token: str) -> None:
    """Run the controller. `CROPI_JOB_RETENTION_S` (default 7 days; 0: forever) and
    `CROPI_LONG_POLL_SLOTS` (default 64) tune it."""
    import uvicorn

    raw_slots = os.environ.get(LONG_POLL_SLOTS_ENV, "").strip()
    if raw_slots and not raw_slots.isdigit():
        raise InputError(f"{LONG_POLL_SLOTS_ENV}: not a whole number")
    app = create_app(bus, jobs, store, Tenants.from_env(token), retention_s=retention_from_env(),
                     long_poll_slots=int(raw_slots) if raw_slots else LONG_POLL_SLOTS)
    uvicorn.run(app, host=host, port=port, log_level="warning")

