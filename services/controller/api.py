"""The controller service: HTTP API (FastAPI) + the stage machine loop.

    POST /v1/jobs                    submit {"spec": "<YAML>"} -> 201 (200 if the same spec was submitted before)
    GET  /v1/jobs                    list
    GET  /v1/jobs/{name}             status
    POST /v1/jobs/{name}/cancel      cancel
    GET  /v1/jobs/{name}/events      events after ?after=<id>, optionally waiting ?wait_ms=
    GET  /healthz, GET /metrics      liveness (no auth), Prometheus metrics (no auth)

Every /v1 route needs `Authorization: Bearer <token>`. The OpenAPI spec is
at /openapi.json.
"""

from __future__ import annotations

import hmac
import logging
import threading
from contextlib import asynccontextmanager
from functools import lru_cache
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Gauge,
    generate_latest,
)
from pydantic import BaseModel, Field

from cropi.curriculum.controller import Controller
from cropi.errors import InputError
from cropi.runtime.jobs import TERMINAL, JobConflict, JobRegistry
from cropi.runtime.queue import TaskBus
from cropi.runtime.store import ObjectStore
from cropi.runtime.tasks import TaskKind
from cropi.spec import parse_spec_yaml

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1 << 20  # a job spec is a few KB; anything near a MiB is a mistake or an attack


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


@lru_cache(maxsize=1024)
def _shape(spec_yaml: str) -> tuple[int, int]:
    # Parsing a spec costs milliseconds; status requests are many and specs never change.
    spec = parse_spec_yaml(spec_yaml)
    return spec.curriculum.stages, spec.total_steps


def _status(rec: dict[str, Any]) -> JobStatus:
    stages, total_steps = _shape(rec["spec"])
    return JobStatus(**{k: rec[k] for k in ("name", "phase", "status", "stage", "step", "created", "updated",
                                             "error", "metrics")},
                     stages=stages, total_steps=total_steps)


def create_app(bus: TaskBus, jobs: JobRegistry, store: ObjectStore, token: str,
               run_loop: bool = True, tick_s: float = 0.2) -> FastAPI:
    if not token:
        raise InputError("the controller needs a bearer token: set CROPI_TOKEN or CROPI_TOKEN_FILE")
    controller = Controller(bus, jobs, store)
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            try:
                if not controller.tick():
                    stop.wait(tick_s)
            except Exception:  # Redis restarting, store unreachable: log, wait, go on
                log.exception("controller tick failed; retrying")
                controller.resync()
                stop.wait(1.0)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        if run_loop:
            threading.Thread(target=loop, name="stage-machine", daemon=True).start()
        yield
        stop.set()

    app = FastAPI(title="cropi controller", version="1", description=__doc__, lifespan=lifespan)
    bearer = HTTPBearer(auto_error=False)

    def authorized(cred: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if cred is None or not hmac.compare_digest(cred.credentials.encode(), token.encode()):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
            return JSONResponse({"detail": f"request body larger than {MAX_BODY_BYTES} bytes"}, status_code=413)
        return await call_next(request)

    def job_or_404(name: str) -> dict[str, Any]:
        rec = jobs.get(name)
        if rec is None:
            raise HTTPException(404, f"no job named {name!r}")
        return rec

    @app.post("/v1/jobs", status_code=201, response_model=JobStatus, dependencies=[Depends(authorized)])
    def submit(body: SubmitRequest, response: Response) -> JobStatus:
        try:
            spec = parse_spec_yaml(body.spec, "request body 'spec'")
        except InputError as err:
            raise HTTPException(422, str(err)) from None
        try:
            created = controller.submit(spec)
        except JobConflict as err:
            raise HTTPException(409, str(err)) from None
        if not created:
            response.status_code = 200
        return _status(jobs.get(spec.name))

    @app.get("/v1/jobs", response_model=list[JobStatus], dependencies=[Depends(authorized)])
    def list_jobs() -> list[JobStatus]:
        return [_status(rec) for rec in (jobs.get(n) for n in jobs.names()) if rec]

    @app.get("/v1/jobs/{name}", response_model=JobStatus, dependencies=[Depends(authorized)])
    def get_job(name: str) -> JobStatus:
        return _status(job_or_404(name))

    @app.post("/v1/jobs/{name}/cancel", status_code=202, response_model=JobStatus, dependencies=[Depends(authorized)])
    def cancel(name: str) -> JobStatus:
        rec = job_or_404(name)
        if rec["phase"] not in TERMINAL:
            jobs.request_cancel(name)
        return _status(jobs.get(name))

    @app.get("/v1/jobs/{name}/events", dependencies=[Depends(authorized)])
    def events(name: str, after: str = Query("0-0", pattern=r"^\d+-\d+$"),
               wait_ms: int = Query(0, ge=0, le=30_000)) -> list[dict[str, Any]]:
        job_or_404(name)
        return jobs.events(name, after=after, block_ms=wait_ms or None)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        bus.r.ping()
        return {"status": "ok"}

    @app.get("/metrics")
    def metrics() -> Response:
        registry = CollectorRegistry()
        depth = Gauge("cropi_queue_depth", "tasks per kind and state", ["kind", "state"], registry=registry)
        for kind in TaskKind:
            for state, n in bus.depth(kind).items():
                depth.labels(kind, state).set(n)
        stage = Gauge("cropi_job_stage", "current stage", ["job"], registry=registry)
        step = Gauge("cropi_job_step", "completed training steps", ["job"], registry=registry)
        acc = Gauge("cropi_job_metric", "latest evaluation summary", ["job", "metric"], registry=registry)
        for name in jobs.names():
            rec = jobs.get(name)
            if rec is None:
                continue
            stage.labels(name).set(rec["stage"])
            step.labels(name).set(rec["step"])
            for key, value in rec["metrics"].items():
                acc.labels(name, key).set(value)
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    app.state.controller = controller
    return app


def serve(host: str, port: int, bus: TaskBus, jobs: JobRegistry, store: ObjectStore, token: str) -> None:
    import uvicorn

    app = create_app(bus, jobs, store, token)
    uvicorn.run(app, host=host, port=port, log_level="warning")

