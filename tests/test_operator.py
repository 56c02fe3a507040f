"""The CurriculumJob operator's handlers against a real controller.

No Kubernetes API server can run here, so kopf's watch loop is not exercised:
the tests call the handler functions (and the kopf-decorated handlers, with
kopf's own Patch/Memo objects) with the spec/meta/status a CurriculumJob would
have. The controller they talk to is real: the FastAPI app served by uvicorn
over HTTP on a real redis-server and a store folder. Its stage machine is off,
so a job stays queued; progress is driven by writing the job record through
JobRegistry, as the controller's stage machine would.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Self

import kopf
import pytest
import uvicorn

from cropi.client import ControllerClient
from cropi.errors import InputError
from cropi.runtime.jobs import JobRegistry
from cropi.runtime.queue import TaskBus
from cropi.runtime.redis_server import free_port
from cropi.runtime.store import LocalStore
from operators import curriculumjob as op
from services.controller.api import create_app
from services.controller.tenancy import DEFAULT_TENANT, Identity, Tenants

TOKEN = "operator-test-token"
SPEC = {"curriculum": {"stages": 2, "steps_per_stage": 3}, "rl": {"lr": 0.01}}
T0, T1, T2 = "2025-01-01T00:00:00Z", "2025-01-01T00:00:10Z", "2025-01-01T00:00:20Z"


class Controller:
    """The controller API served over real HTTP in a thread."""

    def __init__(self, redis_server, store_dir):
        r = redis_server.client()
        self.jobs = JobRegistry(r)
        # The operator's token acts for the namespace it names (here `default`: the single-team
        # case, whose job keys are the plain names; other namespaces: tests/security/test_tenancy.py).
        tenants = Tenants({TOKEN: Identity(DEFAULT_TENANT, operator=True)})
        app = create_app(TaskBus(r), self.jobs, LocalStore(store_dir), tenants, run_loop=False)
        self.url = f"http://127.0.0.1:{free_port()}"
        port = int(self.url.rsplit(":", 1)[1])
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> Self:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "controller did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)

    def client(self, token: str = TOKEN) -> ControllerClient:
        return ControllerClient(self.url, token, timeout_s=5)

    def event_kinds(self, job: str) -> list[str]:
        return [e["kind"] for e in self.jobs.events(job)]


@pytest.fixture
def controller(redis_server, tmp_path):
    with Controller(redis_server, tmp_path / "store") as c:
        yield c


def meta(name: str = "cj-a", generation: int = 1) -> dict:
    return {"name": name, "namespace": "default", "generation": generation}


def condition(status: dict, type_: str) -> dict:
    return next(c for c in status["conditions"] if c["type"] == type_)


def submitted(controller, name: str = "cj-a") -> dict:
    return op.submit(SPEC, meta(name), {}, controller.client(), now=T0)


# ---------------------------------------------------------------- create


def test_create_submits_the_job_named_after_the_resource(controller):
    status = submitted(controller)
    assert status["controllerJob"] == "cj-a" and status["phase"] == op.QUEUED
    assert status["observedGeneration"] == 1 and (status["stage"], status["step"]) == (0, 0)
    assert condition(status, "Submitted") == {
        "type": "Submitted", "status": "True", "reason": "Submitted", "observedGeneration": 1,
        "message": "submitted to the controller as job cj-a", "lastTransitionTime": T0}
    assert controller.jobs.names() == ["cj-a"]
    assert controller.jobs.get("cj-a")["phase"] == "queued"


def test_redelivered_create_submits_nothing_new_and_keeps_transition_times(controller):
    first = submitted(controller)
    again = op.submit(SPEC, meta(), first, controller.client(), now=T1)
    assert controller.event_kinds("cj-a") == ["submitted"]  # one job, one submission
    assert again["controllerJob"] == "cj-a" and again["phase"] == op.QUEUED
    assert condition(again, "Submitted")["lastTransitionTime"] == T0
    assert condition(again, "Submitted")["message"] == "already submitted to the controller as job cj-a"


def test_a_spec_name_that_differs_from_metadata_name_is_refused(controller):
    with pytest.raises(kopf.PermanentError, match="name: 'other' differs from metadata.name 'cj-a'") as err:
        op.submit({**SPEC, "name": "other"}, meta(), {}, controller.client(), now=T0)
    assert err.value.status["phase"] == op.INVALID
    assert controller.jobs.names() == []
    assert op.submit({**SPEC, "name": "cj-a"}, meta(), {}, controller.client())["controllerJob"] == "cj-a"


@pytest.mark.parametrize("spec, field", [
    ({"rl": {"lr": -1}}, "rl.lr: Input should be greater than 0"),
    ({"curriculm": {"stages": 2}}, "curriculm: unknown field"),
])
def test_an_invalid_spec_is_refused_naming_the_field_and_nothing_is_submitted(controller, spec, field):
    with pytest.raises(kopf.PermanentError, match="CurriculumJob default/cj-a .spec") as err:
        op.submit(spec, meta(), {}, controller.client(), now=T0)
    assert field in str(err.value)
    assert err.value.status["phase"] == op.INVALID
    cond = condition(err.value.status, "Submitted")
    assert (cond["status"], cond["reason"]) == ("False", "InvalidSpec") and field in cond["message"]
    assert "controllerJob" not in err.value.status
    assert controller.jobs.names() == []


def test_a_name_taken_by_another_spec_is_a_conflict_and_the_other_job_is_untouched(controller):
    op.submit(SPEC, meta(), {}, controller.client())
    other = {"curriculum": {"stages": 1, "steps_per_stage": 3}}
    with pytest.raises(kopf.PermanentError, match="different spec") as err:
        op.submit(other, meta(generation=2), {}, controller.client(), now=T0)  # e.g. re-created with another spec
    assert err.value.status["phase"] == op.CONFLICT
    assert condition(err.value.status, "Submitted")["reason"] == "NameConflict"
    assert controller.jobs.get("cj-a")["cancel"] == 0


def test_an_unreachable_controller_is_a_temporary_error():
    nobody = ControllerClient(f"http://127.0.0.1:{free_port()}", TOKEN, timeout_s=2)
    with pytest.raises(kopf.TemporaryError, match="unreachable") as err:
        op.submit(SPEC, meta(), {}, nobody)
    assert err.value.delay == op.RETRY_S


def test_a_refused_operator_token_is_a_temporary_error_not_the_jobs_fault(controller):
    with pytest.raises(kopf.TemporaryError, match="401"):
        op.submit(SPEC, meta(), {}, controller.client(token="wrong"))
    assert controller.jobs.names() == []


# ---------------------------------------------------------------- status mirroring


def test_status_mirrors_the_controller_phase_stage_step_and_metrics(controller):
    status = submitted(controller)
    controller.jobs.update("cj-a", phase="train", status="running", stage=1, step=4, metrics={"acc/max1": 0.5})
    status |= op.poll(SPEC, meta(), status, controller.client(), now=T1)
    assert (status["phase"], status["stage"], status["step"]) == (op.RUNNING, 1, 4)
    assert status["metrics"] == {"acc/max1": 0.5}
    assert status["message"] == "train: stage 2/2, step 4/6"
    assert {c["type"]: c["status"] for c in status["conditions"]} == {
        "Submitted": "True", "Running": "True", "Succeeded": "False", "Failed": "False"}


def test_transition_times_change_only_when_a_condition_flips(controller):
    status = submitted(controller)
    controller.jobs.update("cj-a", phase="offline", status="running")
    status |= op.poll(SPEC, meta(), status, controller.client(), now=T1)
    assert condition(status, "Running")["lastTransitionTime"] == T1
    controller.jobs.update("cj-a", phase="train", step=2)
    status |= op.poll(SPEC, meta(), status, controller.client(), now=T2)
    assert condition(status, "Running")["lastTransitionTime"] == T1  # still running: no transition
    assert condition(status, "Succeeded")["lastTransitionTime"] == T0
    assert condition(status, "Submitted")["lastTransitionTime"] == T0


@pytest.mark.parametrize("phase, fields, cr_phase, true_condition, message", [
    ("done", {"status": "succeeded", "stage": 1, "step": 6}, op.SUCCEEDED, "Succeeded", "done: stage 2/2, step 6/6"),
    ("failed", {"status": "failed", "error": "RuntimeError: out of memory"}, op.FAILED, "Failed",
     "RuntimeError: out of memory"),
    ("cancelled", {"status": "cancelled"}, op.CANCELLED, "Failed", "cancelled: stage 1/2, step 0/6"),
])
def test_a_terminal_job_gets_its_final_status_and_polling_stops(controller, phase, fields, cr_phase,
                                                                 true_condition, message):
    status = submitted(controller)
    assert op.needs_polling(status)
    controller.jobs.update("cj-a", phase=phase, **fields)
    status |= op.poll(SPEC, meta(), status, controller.client(), now=T1)
    assert (status["phase"], status["message"]) == (cr_phase, message)
    assert [c["type"] for c in status["conditions"] if c["status"] == "True"] == ["Submitted", true_condition]
    assert condition(status, true_condition)["lastTransitionTime"] == T1
    assert not op.needs_polling(status)
    controller.jobs.update("cj-a", phase="train", step=9)  # whatever the record says now
    assert op.poll(SPEC, meta(), status, controller.client(), now=T2) == {}


def test_nothing_is_polled_for_a_resource_that_was_never_submitted():
    invalid = {"phase": op.INVALID, "conditions": []}
    assert not op.needs_polling(invalid)
    assert op.poll(SPEC, meta(), invalid, ControllerClient("http://127.0.0.1:9", TOKEN)) == {}


def test_a_job_the_controller_lost_is_reported_not_resubmitted(controller):
    status = {"controllerJob": "cj-a", "phase": op.RUNNING, "conditions": []}
    assert op.poll(SPEC, meta(), status, controller.client()) == {
        "phase": op.UNKNOWN, "message": "the controller has no job 'cj-a'"}
    assert controller.jobs.names() == []


# ---------------------------------------------------------------- spec changes


def test_a_spec_change_after_submission_is_refused_and_the_job_runs_on(controller):
    status = submitted(controller)
    controller.jobs.update("cj-a", phase="train", status="running")
    status |= op.poll(SPEC, meta(), status, controller.client(), now=T1)
    changed = {**SPEC, "rl": {"lr": 0.02}}
    with pytest.raises(kopf.PermanentError, match="immutable") as err:
        op.change_spec(changed, meta(generation=2), status, controller.client(), now=T2)
    assert set(err.value.status) == {"conditions"}  # phase, step, controllerJob stay as mirrored
    cond = condition(err.value.status, "SpecAccepted")
    assert (cond["status"], cond["reason"], cond["observedGeneration"]) == ("False", "SpecImmutable", 2)
    assert controller.jobs.get("cj-a")["phase"] == "train"
    assert controller.event_kinds("cj-a") == ["submitted"]


def test_an_invalid_spec_change_after_submission_is_refused_without_marking_the_job_invalid(controller):
    status = submitted(controller)
    with pytest.raises(kopf.PermanentError, match="rl.lr") as err:
        op.change_spec({"rl": {"lr": -1}}, meta(generation=2), status, controller.client(), now=T1)
    assert set(err.value.status) == {"conditions"}
    assert condition(err.value.status, "SpecAccepted")["reason"] == "InvalidSpec"


def test_an_edit_that_leaves_the_job_spec_equal_is_accepted(controller):
    status = submitted(controller)
    spelled_out = {**SPEC, "seed": 0, "name": "cj-a"}  # defaults written out: the same job spec
    patch = op.change_spec(spelled_out, meta(generation=2), status, controller.client(), now=T1)
    cond = condition(patch, "SpecAccepted")
    assert (cond["status"], cond["reason"]) == ("True", "SpecUnchanged")


def test_fixing_an_invalid_spec_before_submission_submits_it(controller):
    with pytest.raises(kopf.PermanentError) as err:
        op.submit({"rl": {"lr": -1}}, meta(), {}, controller.client(), now=T0)
    status = op.change_spec(SPEC, meta(generation=2), err.value.status, controller.client(), now=T1)
    assert status["controllerJob"] == "cj-a" and status["observedGeneration"] == 2
    cond = condition(status, "Submitted")
    assert (cond["status"], cond["lastTransitionTime"]) == ("True", T1)
    assert controller.jobs.names() == ["cj-a"]


# ---------------------------------------------------------------- delete


def test_deleting_a_submitted_job_requests_its_cancellation(controller):
    status = submitted(controller)
    assert op.cancel(SPEC, meta(), status, controller.client())
    assert controller.jobs.cancel_requested("cj-a")
    assert op.cancel(SPEC, meta(), status, controller.client())  # re-delivered: still fine


def test_deleting_a_job_the_controller_does_not_know_is_fine(controller):
    assert not op.cancel(SPEC, meta(), {"controllerJob": "ghost", "phase": op.QUEUED}, controller.client())


def test_deleting_a_resource_that_never_submitted_does_not_cancel_a_same_named_job(controller):
    op.submit(SPEC, meta(), {}, controller.client())  # owned by a resource in namespace "research"
    conflicted = {"phase": op.CONFLICT, "conditions": []}
    assert not op.cancel(SPEC, {**meta(), "namespace": "elsewhere"}, conflicted, controller.client())
    assert not controller.jobs.cancel_requested("cj-a")


def test_deleting_while_the_controller_is_down_is_retried():
    nobody = ControllerClient(f"http://127.0.0.1:{free_port()}", TOKEN, timeout_s=2)
    with pytest.raises(kopf.TemporaryError):
        op.cancel(SPEC, meta(), {"controllerJob": "cj-a", "phase": op.QUEUED}, nobody)


# ---------------------------------------------------------------- the kopf handlers


def test_the_kopf_create_handler_writes_its_result_into_the_status_patch(controller):
    patch, memo = kopf.Patch(), kopf.Memo(client=controller.client())
    op.on_create(spec=SPEC, meta=meta(), status={}, patch=patch, memo=memo)
    assert patch["status"]["controllerJob"] == "cj-a" and patch["status"]["phase"] == op.QUEUED


def test_the_kopf_create_handler_still_patches_the_status_when_it_refuses(controller):
    patch, memo = kopf.Patch(), kopf.Memo(client=controller.client())
    with pytest.raises(kopf.PermanentError):
        op.on_create(spec={"rl": {"lr": -1}}, meta=meta(), status={}, patch=patch, memo=memo)
    assert patch["status"]["phase"] == op.INVALID


def test_the_kopf_timer_and_delete_handlers_drive_the_controller(controller):
    memo = kopf.Memo(client=controller.client())
    status = submitted(controller)
    controller.jobs.update("cj-a", phase="done", status="succeeded", step=6)
    patch = kopf.Patch()
    op.on_poll(spec=SPEC, meta=meta(), status=status, patch=patch, memo=memo)
    assert patch["status"]["phase"] == op.SUCCEEDED
    status = submitted(controller, "cj-b")
    op.on_delete(spec=SPEC, meta=meta("cj-b"), status=status, memo=memo, logger=logging.getLogger("test"))
    assert controller.jobs.cancel_requested("cj-b")


def test_startup_configures_annotation_storage_a_finalizer_least_privilege_modes_and_the_client(monkeypatch, controller):
    monkeypatch.setenv("CROPI_CONTROLLER", controller.url)
    monkeypatch.setenv("CROPI_TOKEN", TOKEN)
    settings, memo = kopf.OperatorSettings(), kopf.Memo()
    op.configure(settings=settings, memo=memo)
    assert isinstance(settings.persistence.progress_storage, kopf.AnnotationsProgressStorage)
    assert isinstance(settings.persistence.diffbase_storage, kopf.AnnotationsDiffBaseStorage)
    assert settings.persistence.finalizer == "cropi.dev/cancel-job"
    assert settings.peering.standalone and settings.scanning.disabled
    assert settings.posting.level == logging.WARNING
    assert memo.client.url == controller.url


def test_startup_fails_fast_without_a_controller_url(monkeypatch):
    monkeypatch.delenv("CROPI_CONTROLLER", raising=False)
    with pytest.raises(InputError, match="CROPI_CONTROLLER"):
        op.configure(settings=kopf.OperatorSettings(), memo=kopf.Memo())
