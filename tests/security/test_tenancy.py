"""Issue H part 2, tenancy in the controller API: a token names a tenant, and a tenant sees,
follows and cancels only its own jobs; the operator acts for its object's namespace, so a
CurriculumJob never adopts or cancels another namespace's job. Each test failed before (one
shared token, one namespace of job names).

The controller app runs in-process on a real redis-server and a real store folder; the operator's
handler functions talk to it over real HTTP. No Kubernetes API server runs here: the operator's
objects are the (spec, meta, status) dicts its handlers receive from kopf.
"""

from __future__ import annotations

import os

import pytest
import yaml
from fastapi.testclient import TestClient

from cropi.client import ControllerClient
from cropi.errors import InputError
from cropi.runtime.jobs import JobRegistry
from cropi.runtime.queue import TaskBus
from cropi.runtime.store import LocalStore
from operators import curriculumjob as op
from services.controller.api import create_app
from services.controller.tenancy import (
    DEFAULT_TENANT,
    OPERATOR_TOKEN_ENV,
    TENANT_HEADER,
    TENANTS_DIR_ENV,
    Identity,
    Tenants,
    job_key,
    split_job_key,
)

from ..controller_http import serve_app
from ..helm_render import render_chart
from ..jobs import tiny_job

ALICE, BOB, OPERATOR, PLAIN = "alice-token-0123456789", "bob-token-0123456789", "operator-token-0123", "plain-token-0123"
TENANTS = Tenants({ALICE: Identity("team-a"), BOB: Identity("team-b"), PLAIN: Identity(DEFAULT_TENANT),
                   OPERATOR: Identity(DEFAULT_TENANT, operator=True)})


def spec(name: str, stages: int = 1) -> str:
    return yaml.safe_dump(tiny_job(name=name, curriculum={"selector": "random", "stages": stages,
                                                          "steps_per_stage": 1, "select_ratio": 0.25}))


@pytest.fixture
def api(redis_server, tmp_path):
    r = redis_server.client()
    app = create_app(TaskBus(r), JobRegistry(r), LocalStore(tmp_path / "store"), TENANTS, run_loop=False)
    with TestClient(app) as client:
        client.store_dir = tmp_path / "store"
        client.jobs = JobRegistry(r)
        yield client


def as_(token: str, **headers: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", **headers}


def test_two_tenants_may_use_the_same_job_name_and_each_gets_its_own_job(api):
    assert api.post("/v1/jobs", json={"spec": spec("c27", stages=1)}, headers=as_(ALICE)).status_code == 201
    # Bob's c27 has another spec: not a conflict, another job.
    assert api.post("/v1/jobs", json={"spec": spec("c27", stages=3)}, headers=as_(BOB)).status_code == 201
    a = api.get("/v1/jobs/c27", headers=as_(ALICE)).json()
    b = api.get("/v1/jobs/c27", headers=as_(BOB)).json()
    assert (a["name"], a["stages"]) == ("c27", 1) and (b["name"], b["stages"]) == ("c27", 3)
    # Stored apart, under keys that name the tenant: records, store prefixes, events.
    assert sorted(api.jobs.names()) == ["team-a.c27", "team-b.c27"]
    assert (api.store_dir / "jobs" / "team-a.c27" / "spec.yaml").is_file()
    assert (api.store_dir / "jobs" / "team-b.c27" / "spec.yaml").is_file()


def test_a_tenant_lists_follows_and_cancels_only_its_own_jobs(api):
    api.post("/v1/jobs", json={"spec": spec("mine")}, headers=as_(ALICE))
    api.post("/v1/jobs", json={"spec": spec("theirs")}, headers=as_(BOB))
    assert [j["name"] for j in api.get("/v1/jobs", headers=as_(ALICE)).json()] == ["mine"]
    assert [j["name"] for j in api.get("/v1/jobs", headers=as_(BOB)).json()] == ["theirs"]
    # Bob's job is as absent to Alice as one that never was: status, events, long-poll, cancel.
    for method, path, params in (("GET", "/v1/jobs/theirs", {}), ("GET", "/v1/jobs/theirs/events", {}),
                                 ("GET", "/v1/jobs/theirs/events", {"wait_ms": 100}),
                                 ("POST", "/v1/jobs/theirs/cancel", {})):
        r = api.request(method, path, params=params, headers=as_(ALICE))
        assert r.status_code == 404, (method, path)
    assert api.jobs.get("team-b.theirs")["cancel"] == 0
    assert api.post("/v1/jobs/theirs/cancel", headers=as_(BOB)).status_code == 202
    assert api.jobs.get("team-b.theirs")["cancel"] == 1


def test_a_job_key_cannot_be_named_to_reach_another_tenants_job(api):
    api.post("/v1/jobs", json={"spec": spec("c27")}, headers=as_(BOB))
    # Neither the key nor a dotted name in a spec reaches team-b's job from another tenant.
    assert api.get("/v1/jobs/team-b.c27", headers=as_(PLAIN)).status_code == 404
    r = api.post("/v1/jobs", json={"spec": spec("team-b.c27")}, headers=as_(PLAIN))
    assert r.status_code == 422 and "name: must be a DNS label" in r.json()["detail"]
    assert sorted(api.jobs.names()) == ["team-b.c27"]


def test_only_the_operator_token_may_act_for_another_tenant(api):
    api.post("/v1/jobs", json={"spec": spec("c27")}, headers=as_(ALICE))
    r = api.get("/v1/jobs/c27", headers=as_(BOB, **{TENANT_HEADER: "team-a"}))
    assert r.status_code == 403 and "team-a" not in r.json()["detail"]
    # A token naming its own tenant is fine; the operator's acts for the namespace it names.
    assert api.get("/v1/jobs", headers=as_(ALICE, **{TENANT_HEADER: "team-a"})).status_code == 200
    assert api.get("/v1/jobs/c27", headers=as_(OPERATOR, **{TENANT_HEADER: "team-a"})).json()["name"] == "c27"
    assert api.get("/v1/jobs/c27", headers=as_(OPERATOR, **{TENANT_HEADER: "team-b"})).status_code == 404
    assert api.get("/v1/jobs", headers=as_(OPERATOR, **{TENANT_HEADER: "Not_A_Namespace"})).status_code == 403


def test_the_docs_pages_are_not_served_and_metrics_name_the_tenant(api):
    api.post("/v1/jobs", json={"spec": spec("c27")}, headers=as_(ALICE))
    assert api.get("/docs").status_code == 404 and api.get("/redoc").status_code == 404
    assert 'cropi_job_step{job="c27",tenant="team-a"} 0.0' in api.get("/metrics").text


# ------------------------------------------------------------------ the operator, one tenant per namespace
@pytest.fixture
def controller_url(redis_server, tmp_path):
    r = redis_server.client()
    app = create_app(TaskBus(r), JobRegistry(r), LocalStore(tmp_path / "store"), TENANTS, run_loop=False)
    with serve_app(app) as url:
        yield url, JobRegistry(r)


def test_a_curriculumjob_never_adopts_or_cancels_another_namespaces_job(controller_url):
    url, jobs = controller_url
    operator = ControllerClient(url, OPERATOR, timeout_s=5)
    body = {"curriculum": {"stages": 2, "steps_per_stage": 3}, "rl": {"lr": 0.01}}
    in_a = op.submit(body, {"name": "c27", "namespace": "team-a", "generation": 1}, {}, operator)
    # team-b's object of the same name, with another spec: its own job, not a conflict, not an adoption.
    other = {"curriculum": {"stages": 1, "steps_per_stage": 3}, "rl": {"lr": 0.01}}
    b_meta = {"name": "c27", "namespace": "team-b", "generation": 1}
    in_b = op.submit(other, b_meta, {}, operator)
    assert in_a["phase"] == in_b["phase"] == op.QUEUED
    assert sorted(jobs.names()) == ["team-a.c27", "team-b.c27"]
    # Deleting team-b's object cancels team-b's job only.
    assert op.cancel(other, b_meta, in_b, operator)
    assert jobs.cancel_requested("team-b.c27") and not jobs.cancel_requested("team-a.c27")
    # And team-a's status is team-a's: two stages, not team-b's one.
    assert op.poll(body, {"name": "c27", "namespace": "team-a"}, in_a, operator)["message"].endswith("step 0/6")


def test_the_cli_escapes_a_job_name_so_it_cannot_walk_to_another_path(controller_url):
    url, jobs = controller_url
    client = ControllerClient(url, PLAIN, timeout_s=5)
    client.submit(spec("c27"))
    with pytest.raises(InputError, match="404"):
        client.cancel("../jobs/c27")
    with pytest.raises(InputError, match="40[45]"):  # the server sees /v1/jobs/c27/cancel, but as a GET
        client.status("c27/cancel")
    assert not jobs.cancel_requested("c27")


# ------------------------------------------------------------------ where the tokens come from
def test_tenant_tokens_come_from_a_mounted_secret_folder(tmp_path, monkeypatch):
    """The layout a Secret volume has: one file per key, beside Kubernetes' `..data` links."""
    folder = tmp_path / "tenants"
    (folder / "..2026_12_01").mkdir(parents=True)
    (folder / "..2026_12_01" / "team-a").write_text(ALICE + "\n")
    (folder / "..data").symlink_to("..2026_12_01")
    (folder / "team-a").symlink_to("..data/team-a")
    (tmp_path / "operator").write_text(OPERATOR)
    monkeypatch.setenv(TENANTS_DIR_ENV, str(folder))
    monkeypatch.setenv(OPERATOR_TOKEN_ENV, str(tmp_path / "operator"))
    tenants = Tenants.from_env(PLAIN)
    assert tenants.identify(f"Bearer {ALICE}") == Identity("team-a")
    assert tenants.identify(f"Bearer {PLAIN}") == Identity(DEFAULT_TENANT)
    assert tenants.identify(f"Bearer {OPERATOR}") == Identity(DEFAULT_TENANT, operator=True)
    assert tenants.identify(f"Bearer {ALICE}x") is None and tenants.identify(ALICE) is None


@pytest.mark.parametrize("files, message", [
    ({"Team_A": ALICE}, "'Team_A' is not a tenant name"),
    ({"team-a": "short"}, "tenant team-a is shorter than 12 characters"),
    ({"team-a": ALICE, "team-b": ALICE}, "tenants team-a and team-b have the same token"),
    ({"default": ALICE}, "the tenant default takes CROPI_TOKEN"),
])
def test_a_bad_tenants_folder_is_refused_without_echoing_a_token(tmp_path, monkeypatch, files, message):
    for name, token in files.items():
        (tmp_path / name).write_text(token)
    monkeypatch.setenv(TENANTS_DIR_ENV, str(tmp_path))
    monkeypatch.delenv(OPERATOR_TOKEN_ENV, raising=False)
    with pytest.raises(InputError, match=message) as err:
        Tenants.from_env()
    assert ALICE not in str(err.value) and "short" not in str(err.value).replace("shorter", "")


def test_a_controller_without_any_token_does_not_start(monkeypatch):
    for var in (TENANTS_DIR_ENV, OPERATOR_TOKEN_ENV):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(InputError, match="needs a bearer token"):
        Tenants.from_env("")


@pytest.mark.parametrize("tenant, name", [("default", "c27"), ("team-a", "c27"), ("a", "b-c")])
def test_a_job_key_names_one_tenants_job(tenant, name):
    assert split_job_key(job_key(tenant, name)) == (tenant, name)


def test_no_environment_leaks_between_tests():
    assert TENANTS_DIR_ENV not in os.environ


# ------------------------------------------------------------------ the chart
def _container(objects, deployment: str) -> tuple[dict, dict]:
    """(container, pod spec) of the Deployment named `deployment`."""
    pod = next(o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == deployment)
    pod = pod["spec"]["template"]["spec"]
    return pod["containers"][0], pod


def test_the_chart_gives_the_operator_its_own_token_and_mounts_only_that_one():
    objects = render_chart()
    operator, operator_pod = _container(objects, "demo-cropi-operator")
    controller, controller_pod = _container(objects, "demo-cropi-controller")
    env = {e["name"]: e for e in operator["env"]}
    assert env["CROPI_TOKEN_FILE"]["value"] == "/var/run/cropi/token/operator-token"
    token_volume = next(v for v in operator_pod["volumes"] if v["name"] == "token")
    assert token_volume["secret"]["items"] == [{"key": "operator-token", "path": "operator-token"}]
    # The controller knows it as the operator's (the identity that may name a namespace).
    env = {e["name"]: e for e in controller["env"]}
    assert env["CROPI_OPERATOR_TOKEN_FILE"]["value"] == "/var/run/cropi/operator/operator-token"
    volume = next(v for v in controller_pod["volumes"] if v["name"] == "operator-token")
    assert volume["secret"]["items"] == [{"key": "operator-token", "path": "operator-token"}]
    secret = next(o for o in objects if o["kind"] == "Secret" and o["metadata"]["name"] == "demo-cropi-token")
    assert set(secret["data"]) == {"token", "operator-token"} and len(set(secret["data"].values())) == 2
    assert "CROPI_TENANTS_DIR" not in env  # one tenant unless a tenants Secret is named


def test_the_chart_mounts_a_tenants_secret_and_sets_the_retention():
    objects = render_chart({"auth": {"tenantsSecret": "cropi-tenants"}, "controller": {"jobRetentionSeconds": 3600}})
    controller, pod = _container(objects, "demo-cropi-controller")
    env = {e["name"]: e.get("value") for e in controller["env"]}
    assert env["CROPI_TENANTS_DIR"] == "/var/run/cropi/tenants" and env["CROPI_JOB_RETENTION_S"] == "3600"
    mount = next(m for m in controller["volumeMounts"] if m["name"] == "tenants")
    assert mount == {"name": "tenants", "mountPath": "/var/run/cropi/tenants", "readOnly": True}
    assert next(v for v in pod["volumes"] if v["name"] == "tenants")["secret"]["secretName"] == "cropi-tenants"
