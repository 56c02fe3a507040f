"""The CurriculumJob operator (kopf): a Kubernetes front door to the controller API.

    created          -> the spec is checked here and submitted to the controller
    every POLL_S     -> the controller's status is mirrored into .status (until a terminal phase)
    .spec changed    -> refused once submitted: a job's spec is immutable
    deleted          -> the job is cancelled at the controller (a finalizer keeps the object until then)

The handler logic lives in plain functions of (spec, meta, status, client) that
return the status fields to patch, so it runs without a Kubernetes API server;
the kopf handlers at the bottom only wire them to kopf's `patch`/`memo`.
Run: `kopf run -m operators.curriculumjob --standalone --all-namespaces` (see README.md).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import httpx
import kopf

from cropi.client import TENANT_HEADER, ControllerClient, job_path, response_detail
from cropi.crd import GROUP, PLURAL, VERSION, job_spec_of
from cropi.errors import InputError
from cropi.runtime.jobs import Phase
from cropi.spec import JobSpec

FINALIZER = f"{GROUP}/cancel-job"
POLL_S = float(os.environ.get("CROPI_OPERATOR_POLL_S", "10"))
RETRY_S = float(os.environ.get("CROPI_OPERATOR_RETRY_S", "30"))

# The CR's phases. Invalid and Conflict mean "never submitted"; the last three are terminal.
QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "Queued", "Running", "Succeeded", "Failed", "Cancelled"
INVALID, CONFLICT, UNKNOWN = "Invalid", "Conflict", "Unknown"
TERMINAL = (SUCCEEDED, FAILED, CANCELLED)
# Every non-terminal controller phase other than "queued" is work in progress
# (offline, project, select, train, and any stage kind added later).
_PHASES = {Phase.QUEUED: QUEUED, Phase.DONE: SUCCEEDED, Phase.FAILED: FAILED, Phase.CANCELLED: CANCELLED}

Status = dict[str, Any]


class Refused(kopf.PermanentError):
    """The object cannot be acted on as it is; `status` is what .status must say about it."""

    def __init__(self, message: str, status: Status):
        super().__init__(message)
        self.status = status


# ---------------------------------------------------------------- conditions


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def set_condition(conditions: list[Mapping[str, Any]] | None, type_: str, value: bool, reason: str,
                  message: str, now: str, generation: int | None = None) -> list[dict[str, Any]]:
    """`conditions` with `type_` set; its lastTransitionTime moves only when its status flips,
    so `kubectl wait` and dashboards see real transitions, not every poll."""
    new = {"type": type_, "status": "True" if value else "False", "reason": reason, "message": message,
           "lastTransitionTime": now}
    if generation is not None:
        new["observedGeneration"] = generation
    out, found = [], False
    for cond in conditions or []:
        if cond.get("type") == type_:
            found = True
            if cond.get("status") == new["status"]:
                new["lastTransitionTime"] = cond.get("lastTransitionTime", now)
            out.append(new)
        else:
            out.append(dict(cond))
    return out if found else [*out, new]


def _lifecycle_conditions(conditions: list[Mapping[str, Any]] | None, phase: str, message: str,
                          now: str) -> list[dict[str, Any]]:
    # Submitted is set by the submit path; these three follow the controller's phase.
    conditions = set_condition(conditions, "Running", phase == RUNNING, phase, message, now)
    conditions = set_condition(conditions, "Succeeded", phase == SUCCEEDED, phase, message, now)
    return set_condition(conditions, "Failed", phase in (FAILED, CANCELLED), phase, message, now)


# ---------------------------------------------------------------- controller calls


def _call(client: ControllerClient, method: str, path: str, meta: Mapping[str, Any], **kwargs: Any) -> httpx.Response:
    """A controller request for the object's namespace (its tenant: a CurriculumJob sees and
    cancels only its own namespace's jobs), whose 4xx answers come back for the handler to judge
    (ControllerClient folds them all into InputError); unreachable, 5xx or a refused token -> TemporaryError."""
    headers = {TENANT_HEADER: meta.get("namespace") or "default"}
    try:
        r = client.http.request(method, path, headers=headers, **kwargs)
    except httpx.HTTPError as err:
        raise kopf.TemporaryError(f"controller {client.url} unreachable: {err}", delay=RETRY_S) from None
    if r.status_code == 401:
        # The operator's token is wrong: an installation fault that a fixed Secret cures, so keep retrying.
        raise kopf.TemporaryError(f"controller {client.url} refused the operator's token (401)", delay=RETRY_S)
    if r.status_code >= 500:
        raise kopf.TemporaryError(f"controller error ({r.status_code}): {r.text[:500]}", delay=RETRY_S)
    return r


# ---------------------------------------------------------------- handler logic


def job_spec(spec: Mapping[str, Any], meta: Mapping[str, Any]) -> JobSpec:
    """The job spec of a CurriculumJob: `.spec`, named after metadata.name. InputError names the field."""
    return job_spec_of({"spec": dict(spec), "metadata": dict(meta)})


def mirror(record: Mapping[str, Any], status: Mapping[str, Any], now: str) -> Status:
    """The .status fields that reflect a controller job record (GET /v1/jobs/{name})."""
    phase = _PHASES.get(record["phase"], RUNNING)
    if record.get("error"):
        message = record["error"]
    else:
        message = (f"{record['phase']}: stage {record['stage'] + 1}/{record.get('stages', '?')}, "
                   f"step {record['step']}/{record.get('total_steps', '?')}")
    return {"phase": phase, "stage": record["stage"], "step": record["step"],
            "metrics": dict(record.get("metrics") or {}), "message": message,
            "conditions": _lifecycle_conditions(status.get("conditions"), phase, message, now)}


def submit(spec: Mapping[str, Any], meta: Mapping[str, Any], status: Mapping[str, Any],
           client: ControllerClient, now: str | None = None) -> Status:
    """Submit the job (again, on re-delivery: the controller answers 200 for the same spec).

    Raises Refused (spec invalid, or the name taken by another spec) and kopf.TemporaryError
    (controller unreachable)."""
    now = now or now_rfc3339()
    conditions = status.get("conditions")

    def refused(phase: str, reason: str, message: str) -> Refused:
        return Refused(message, {"phase": phase, "message": message, "conditions": set_condition(
            conditions, "Submitted", False, reason, message, now, meta.get("generation"))})

    try:
        job = job_spec(spec, meta)
    except InputError as err:
        raise refused(INVALID, "InvalidSpec", str(err)) from None
    r = _call(client, "POST", "/v1/jobs", meta, json={"spec": job.to_yaml()})
    if r.status_code == 409:
        raise refused(CONFLICT, "NameConflict", response_detail(r))
    if r.status_code >= 400:  # 422: the controller runs a different spec version than the operator
        raise refused(INVALID, "InvalidSpec", f"controller refused the spec ({r.status_code}): {response_detail(r)}")
    verb = "submitted" if r.status_code == 201 else "already submitted"
    conditions = set_condition(conditions, "Submitted", True, "Submitted",
                               f"{verb} to the controller as job {job.name}", now, meta.get("generation"))
    out = mirror(r.json(), {**status, "conditions": conditions}, now)
    out.update(controllerJob=job.name, observedGeneration=meta.get("generation"))
    return out


def change_spec(spec: Mapping[str, Any], meta: Mapping[str, Any], status: Mapping[str, Any],
                client: ControllerClient, now: str | None = None) -> Status:
    """A .spec update. Before any submission (it was Invalid or in Conflict) it is a new try;
    after, the job's spec is immutable: the controller answers 200 only for the spec it runs
    (an edit that was undone, or only reformatted), and anything else is refused without
    touching the mirrored phase."""
    if not status.get("controllerJob"):
        return submit(spec, meta, status, client, now)
    now = now or now_rfc3339()
    generation = meta.get("generation")

    def verdict(accepted: bool, reason: str, message: str) -> Status:
        return {"conditions": set_condition(status.get("conditions"), "SpecAccepted", accepted, reason,
                                            message, now, generation)}

    try:
        job = job_spec(spec, meta)
    except InputError as err:
        message = f"spec change refused, the job runs its submitted spec: {err}"
        raise Refused(message, verdict(False, "InvalidSpec", message)) from None
    r = _call(client, "POST", "/v1/jobs", meta, json={"spec": job.to_yaml()})
    if r.status_code in (200, 201):
        return verdict(True, "SpecUnchanged", "the spec is the one the job was submitted with")
    message = (f"a submitted job's spec is immutable (generation {generation} refused); "
               f"create a CurriculumJob with another name to run a changed spec")
    raise Refused(message, verdict(False, "SpecImmutable", message))


def needs_polling(status: Mapping[str, Any]) -> bool:
    """Only submitted jobs that have not ended have a controller status worth reading."""
    return bool(status.get("controllerJob")) and status.get("phase") not in TERMINAL


def poll(spec: Mapping[str, Any], meta: Mapping[str, Any], status: Mapping[str, Any],
         client: ControllerClient, now: str | None = None) -> Status:
    """The .status fields to patch from the controller's current view; {} when nothing to read."""
    if not needs_polling(status):
        return {}
    now = now or now_rfc3339()
    job = status["controllerJob"]
    r = _call(client, "GET", job_path(job), meta)
    if r.status_code == 404:
        # The controller lost the job (its Redis was wiped). Resubmitting would silently restart
        # training, so say so and keep looking: a restored Redis brings it back.
        return {"phase": UNKNOWN, "message": f"the controller has no job {job!r}"}
    if r.status_code >= 400:
        raise kopf.TemporaryError(f"controller refused GET {job} ({r.status_code}): {response_detail(r)}", delay=RETRY_S)
    return mirror(r.json(), status, now)


def cancel(spec: Mapping[str, Any], meta: Mapping[str, Any], status: Mapping[str, Any],
           client: ControllerClient) -> bool:
    """Cancel the job at the controller; False if there was nothing to cancel.

    Only a job this object submitted is cancelled: an Invalid or Conflict object's name may
    belong to another object's job."""
    job = status.get("controllerJob")
    if not job or status.get("phase") in TERMINAL:
        return False
    r = _call(client, "POST", job_path(job, "cancel"), meta)
    if r.status_code == 404:  # already gone at the controller: nothing left to stop
        return False
    if r.status_code >= 400:
        raise kopf.TemporaryError(f"controller refused to cancel {job} ({r.status_code}): {response_detail(r)}",
                                  delay=RETRY_S)
    return True


# ---------------------------------------------------------------- kopf wiring


def _apply(patch: kopf.Patch, fields: Status) -> None:
    patch.status.update({k: v for k, v in fields.items() if v is not None})


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    # Progress and diff-base go to annotations: the CRD's .status schema is closed, so the
    # API server would prune kopf's default status.kopf and handlers would re-run forever.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=GROUP)
    settings.persistence.finalizer = FINALIZER
    # One replica is enough and peering would need kopf's own CRDs and cluster-wide RBAC.
    settings.peering.standalone = True
    # The chart installs the CRD before the operator starts, so there is nothing to discover at
    # runtime; watching CRDs and namespaces would need cluster-wide read rights for no gain.
    settings.scanning.disabled = True
    # Kubernetes Events only for what a user must act on; the rest stays in the operator's log.
    settings.posting.level = logging.WARNING
    memo.client = ControllerClient()  # CROPI_CONTROLLER + CROPI_TOKEN / CROPI_TOKEN_FILE; fails fast if unset


@kopf.on.create(GROUP, VERSION, PLURAL)
def on_create(spec: kopf.Spec, meta: kopf.Meta, status: kopf.Status, patch: kopf.Patch, memo: kopf.Memo,
              **_: Any) -> None:
    _guarded(submit, spec, meta, status, patch, memo)


@kopf.on.update(GROUP, VERSION, PLURAL, field="spec")
def on_spec_change(spec: kopf.Spec, meta: kopf.Meta, status: kopf.Status, patch: kopf.Patch, memo: kopf.Memo,
                   **_: Any) -> None:
    _guarded(change_spec, spec, meta, status, patch, memo)


@kopf.timer(GROUP, VERSION, PLURAL, interval=POLL_S, when=lambda status, **_: needs_polling(status))
def on_poll(spec: kopf.Spec, meta: kopf.Meta, status: kopf.Status, patch: kopf.Patch, memo: kopf.Memo,
            **_: Any) -> None:
    _apply(patch, poll(spec, meta, status, memo.client))


@kopf.on.delete(GROUP, VERSION, PLURAL)
def on_delete(spec: kopf.Spec, meta: kopf.Meta, status: kopf.Status, memo: kopf.Memo, logger: logging.Logger,
              **_: Any) -> None:
    if cancel(spec, meta, status, memo.client):
        logger.info("cancel requested for job %s", status.get("controllerJob"))


def _guarded(handler, spec, meta, status, patch, memo) -> None:
    # A refusal must still reach .status (kopf applies `patch` after a failed handler too).
    try:
        _apply(patch, handler(spec, meta, status, memo.client))
    except Refused as err:
        _apply(patch, err.status)
        raise
