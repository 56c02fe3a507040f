"""The controller's HTTP API on a real Redis and a store folder: auth, input
validation that names the field, limits, and nothing stored changed by a
refused request. (The stage machine is off here; test_services runs it.)"""

import json
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient

from cropi.runtime.jobs import JobRegistry
from cropi.runtime.queue import TaskBus
from cropi.runtime.store import LocalStore
from services.controller.api import MAX_BODY_BYTES, create_app

TOKEN = "s3cret-token"
GOOD = {"name": "api-job", "curriculum": {"stages": 2, "steps_per_stage": 3}}


@pytest.fixture
def api(redis_server, tmp_path):
    r = redis_server.client()
    store = LocalStore(tmp_path / "store")
    app = create_app(TaskBus(r), JobRegistry(r), store, TOKEN, run_loop=False)
    client = TestClient(app, headers={"Authorization": f"Bearer {TOKEN}"})
    client.redis, client.store = r, store
    return client


def snapshot(api) -> tuple:
    """Everything a request could have changed: every Redis key with its value, every stored object."""
    r = api.redis
    read = {b"string": r.get, b"hash": r.hgetall, b"stream": r.xrange, b"zset": lambda k: r.zrange(k, 0, -1, withscores=True),
            b"set": r.smembers, b"list": lambda k: r.lrange(k, 0, -1)}
    values = {k: read[r.type(k)](k) for k in sorted(r.keys("*"))}
    objects = {k: api.store.get(k) for k in api.store.list("")}
    return values, objects


def post_spec(api, spec, **kwargs):
    text = spec if isinstance(spec, str) else yaml.safe_dump(spec)
    return api.post("/v1/jobs", json={"spec": text}, **kwargs)


def test_submit_then_status_list_events_and_cancel(api):
    r = post_spec(api, GOOD)
    assert r.status_code == 201, r.text
    assert r.json()["phase"] == "queued" and r.json()["total_steps"] == 6
    assert post_spec(api, GOOD).status_code == 200  # same spec again: idempotent
    assert [j["name"] for j in api.get("/v1/jobs").json()] == ["api-job"]
    assert api.get("/v1/jobs/api-job").json()["stages"] == 2
    assert yaml.safe_load(api.store.get("jobs/api-job/spec.yaml"))["name"] == "api-job"
    assert api.post("/v1/jobs/api-job/cancel").status_code == 202
    kinds = [e["kind"] for e in api.get("/v1/jobs/api-job/events").json()]
    assert kinds == ["submitted", "cancel_requested"]
    after = api.get("/v1/jobs/api-job/events").json()[0]["id"]
    assert [e["kind"] for e in api.get("/v1/jobs/api-job/events", params={"after": after}).json()] == [
        "cancel_requested"]


def test_the_openapi_spec_describes_the_routes(api):
    paths = api.get("/openapi.json").json()["paths"]
    assert {"/v1/jobs", "/v1/jobs/{name}", "/v1/jobs/{name}/cancel", "/v1/jobs/{name}/events"} <= set(paths)


def test_metrics_are_exposed_for_prometheus(api):
    post_spec(api, GOOD)
    text = api.get("/metrics").text
    assert 'cropi_queue_depth{kind="train",state="waiting"} 0.0' in text
    assert 'cropi_job_stage{job="api-job",tenant="default"} 0.0' in text


def test_a_controller_without_a_token_refuses_to_start(redis_server, tmp_path):
    from cropi.errors import InputError

    r = redis_server.client()
    with pytest.raises(InputError, match="CROPI_TOKEN"):
        create_app(TaskBus(r), JobRegistry(r), LocalStore(tmp_path), "", run_loop=False)


BAD_REQUESTS = [
    # (description, request kwargs builder, expected status, text the error must contain)
    ("no token", lambda: dict(headers={"Authorization": ""}), 401, "bearer token"),
    ("wrong token", lambda: dict(headers={"Authorization": "Bearer nope"}), 401, "bearer token"),
    ("basic auth", lambda: dict(headers={"Authorization": "Basic dXNlcjpwdw=="}), 401, "bearer token"),
    ("body not JSON", lambda: dict(content=b"name: x", headers={"Content-Type": "application/json"}), 422, "JSON"),
    ("no spec field", lambda: dict(json={"job": "x"}), 422, "spec"),
    ("spec not a string", lambda: dict(json={"spec": {"name": "x"}}), 422, "spec"),
    ("spec not YAML", lambda: dict(json={"spec": "name: [unclosed"}), 422, "not valid YAML"),
    ("spec a list", lambda: dict(json={"spec": "- a\n- b\n"}), 422, "top level must be a mapping"),
    ("unknown key", lambda: dict(json={"spec": "name: x\nrl:\n  learning_rate: 0.1\n"}), 422, "rl.learning_rate"),
    ("unknown key line", lambda: dict(json={"spec": "name: x\nrl:\n  learning_rate: 0.1\n"}), 422, "line 3"),
    ("wrong type", lambda: dict(json={"spec": "rl: {lr: fast}"}), 422, "rl.lr"),
    ("negative stages", lambda: dict(json={"spec": "curriculum: {stages: -1}"}), 422, "curriculum.stages"),
    ("unknown selector", lambda: dict(json={"spec": "curriculum: {selector: best}"}), 422, "curriculum.selector"),
    ("ratio above 1", lambda: dict(json={"spec": "curriculum: {select_ratio: 2}"}), 422, "select_ratio"),
    ("bad job name", lambda: dict(json={"spec": "name: My Job"}), 422, "name: Value error, must be a DNS label"),
    ("path in job name", lambda: dict(json={"spec": "name: ../etc"}), 422, "name: Value error, must be a DNS label"),
    ("body too large", lambda: dict(json={"spec": "#" * (MAX_BODY_BYTES + 10)}), 413, "larger than"),
]


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_a_bad_submit_is_refused_naming_the_problem_and_changes_nothing(api, case):
    _, build, status, message = case
    post_spec(api, GOOD)  # something stored already, which must survive untouched
    before = snapshot(api)
    kwargs = build()
    if "json" not in kwargs and "content" not in kwargs:
        kwargs["json"] = {"spec": yaml.safe_dump({**GOOD, "name": "another"})}
    r = api.post("/v1/jobs", **kwargs)
    assert r.status_code == status, r.text
    assert message in r.text
    assert snapshot(api) == before


def test_a_different_spec_under_a_taken_name_is_a_conflict_and_changes_nothing(api):
    post_spec(api, GOOD)
    before = snapshot(api)
    r = post_spec(api, {**GOOD, "seed": 7})
    assert r.status_code == 409 and "different spec" in r.text
    assert snapshot(api) == before


@pytest.mark.parametrize("method, path, params, status", [
    ("get", "/v1/jobs/nope", None, 404),
    ("post", "/v1/jobs/nope/cancel", None, 404),
    ("get", "/v1/jobs/nope/events", None, 404),
    ("get", "/v1/jobs/api-job/events", {"after": "last"}, 422),
    ("get", "/v1/jobs/api-job/events", {"wait_ms": 999_999}, 422),
])
def test_unknown_jobs_and_bad_query_parameters(api, method, path, params, status):
    post_spec(api, GOOD)
    before = snapshot(api)
    r = getattr(api, method)(path, params=params)
    assert r.status_code == status, r.text
    assert snapshot(api) == before


def test_every_v1_route_needs_the_token(api):
    post_spec(api, GOOD)
    anonymous = TestClient(api.app)
    for method, path in [("get", "/v1/jobs"), ("get", "/v1/jobs/api-job"), ("post", "/v1/jobs/api-job/cancel"),
                         ("get", "/v1/jobs/api-job/events")]:
        assert getattr(anonymous, method)(path).status_code == 401, path
    assert json.loads(api.redis.hget("cropi:job:api-job", "cancel")) == 0


def test_the_committed_openapi_spec_matches_the_api(api):
    """docs/openapi.json is what clients are generated from; regenerate it with
    `python -c "from tests.test_api import write_openapi; write_openapi()"` after changing the API."""
    committed = json.loads((Path(__file__).parent.parent / "docs" / "openapi.json").read_text())
    assert _surface(committed) == _surface(api.app.openapi())


def _surface(spec: dict) -> dict:
    """Routes, methods, parameters and schema fields: what clients depend on (not FastAPI's formatting)."""
    routes = {path: {m: sorted(p["name"] for p in op.get("parameters", [])) for m, op in ops.items()}
              for path, ops in spec["paths"].items()}
    schemas = {name: sorted(s.get("properties", {})) for name, s in spec["components"]["schemas"].items()}
    return {"routes": routes, "schemas": schemas}


def write_openapi() -> None:
    import redis as redis_lib

    r = redis_lib.Redis()  # never contacted: building the schema does not touch Redis
    app = create_app(TaskBus(r), JobRegistry(r), LocalStore(Path("/tmp/cropi-openapi")), "openapi-token-x", run_loop=False)
    (Path(__file__).parent.parent / "docs" / "openapi.json").write_text(json.dumps(app.openapi(), indent=2) + "\n")
