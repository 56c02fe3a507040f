"""A standing rollout app (the chart's RayService: one Serve app that outlives
jobs) serves one job at a time. A job claims it on the weight board and starts
from the base weights; replicas answer a job only with that job's weights;
while another running job holds the app, the job's tasks are deferred; an app
serving another model is refused naming the fields that differ."""

from __future__ import annotations

import copy

import pytest

from cropi.errors import InputError
from cropi.rollout.base import SamplingParams
from cropi.rollout.hf import HFRolloutEngine
from cropi.runtime.jobs import JobRegistry
from cropi.spec import parse_spec

from .conftest import TEST_MODEL
from .weights import perturbed

pytest.importorskip("ray", reason="the rollout service needs the `ray` extra")

from ray import serve

from cropi.runtime.tasks import Deferred
from cropi.executors.ray import standing_rollout
from cropi.executors.ray.replica import HFReplicaEngine, RolloutReplica
from cropi.executors.ray.rollout_serve import (
    ServeRolloutEngine,
    run_app,
    stop_rollout_service,
)
from cropi.executors.ray.weight_sync import named_weights

APP = "cropi-rollout-standing-test"
PROMPTS = ["1+2=", "max(12,3456)=", "rev(98)="]
BATCH = 4
SAMPLED = SamplingParams(temperature=0.8, max_new_tokens=6, seed=5)


def _responses(groups) -> list[list[list[int]]]:
    return [[t.response_ids for t in g] for g in groups]


def _spec(name: str, **overrides):
    return parse_spec({"name": name, "executor": "ray", "model": {"path": TEST_MODEL},
                       "rollout": {"batch_size": BATCH}, **overrides})


# --------------------------------------------------------------------- the replica


def test_a_replica_goes_back_to_its_base_weights_when_the_next_job_claims_it(tiny_model):
    model, tok = tiny_model
    engine = HFReplicaEngine(copy.deepcopy(model), tok, batch_size=BATCH)
    replica = RolloutReplica(engine, engine.weight_names, base_weights=lambda: named_weights(model))
    base = HFRolloutEngine(model, tok, batch_size=BATCH).generate(PROMPTS, 2, SAMPLED)
    trained = perturbed(model, seed=1)

    replica.load_base("job-a")
    replica.load_weights(trained.state_dict().items(), version=5)
    assert (replica.owner, replica.version) == ("job-a", 5)
    assert replica.holds("job-a", 5) and not replica.holds("job-b", 0)
    assert _responses(replica.generate_many([(PROMPTS, 2, SAMPLED)], 1.0)[0]) != _responses(base)

    replica.load_base("job-b")

    assert (replica.owner, replica.version) == ("job-b", 0)
    assert replica.holds("job-b", 0) and not replica.holds("job-b", 1) and not replica.holds("job-a", 0)
    assert _responses(replica.generate_many([(PROMPTS, 2, SAMPLED)], 1.0)[0]) == _responses(base)


def test_a_job_whose_model_differs_from_the_apps_is_refused_naming_the_fields():
    described = {"model_path": TEST_MODEL, "dtype": "float32", "engine": "hf", "batch_size": BATCH, "replicas": 1}
    standing_rollout.check_serves(described, _spec("fits"), APP)  # the same model, dtype, engine, chunk

    with pytest.raises(InputError) as err:
        standing_rollout.check_serves(described, _spec("other", model={"path": "/models/other", "dtype": "bfloat16"},
                                                       rollout={"batch_size": 8}), APP)
    message = str(err.value)
    assert message.startswith(f"ray.rollout_app: the standing rollout app {APP} cannot serve job other:")
    assert "model.path is '/models/other', the app serves" in message
    assert "model.dtype is 'bfloat16', the app serves 'float32'" in message
    assert "rollout.batch_size is 8, the app serves 4" in message


def test_the_app_is_named_by_the_spec_or_else_by_the_workers_environment(monkeypatch):
    monkeypatch.delenv(standing_rollout.ENV_APP, raising=False)
    assert standing_rollout.standing_app_name(_spec("j")) is None
    monkeypatch.setenv(standing_rollout.ENV_APP, "cropi-rollout")
    assert standing_rollout.standing_app_name(_spec("j")) == "cropi-rollout"
    assert standing_rollout.standing_app_name(_spec("j", ray={"rollout_app": "mine"})) == "mine"


# --------------------------------------------------------------------- on Ray Serve


@pytest.fixture(scope="module")
def standing(ray_local, tiny_model):
    """The app as a RayService deploys it: services.rollout.app:build_app with string arguments."""
    from services.rollout.app import build_app

    serve.start(proxy_location="Disabled")
    handle = run_app(build_app({"model_path": TEST_MODEL, "batch_size": str(BATCH), "version_wait_s": "3",
                                "replicas": "1", "cpus": "1"}), APP)
    yield handle
    stop_rollout_service(APP)
    serve.shutdown()


@pytest.fixture
def jobs(redis_server):
    registry = JobRegistry(redis_server.client())
    for job in ("job-a", "job-b"):
        registry.create(job, _spec(job).to_yaml())
    return registry


def test_jobs_take_turns_on_the_app_and_each_starts_from_the_base_weights(standing, jobs, tiny_model, tmp_path):
    import ray

    from cropi.executors.ray.weight_channel import get_or_create_board
    from cropi.executors.ray.weight_sync import publish_weights
    from cropi.runtime.store import LocalStore

    model, tok = tiny_model
    base = HFRolloutEngine(model, tok, batch_size=BATCH).generate(PROMPTS, 2, SAMPLED)
    trained = perturbed(model, seed=2)
    assert standing.describe.remote().result()["replicas"] == 1

    # Job a claims the app, samples the base model, then its trainer publishes version 1.
    standing_rollout.claim(APP, "job-a", jobs)
    assert _responses(ServeRolloutEngine(standing, owner="job-a").generate(PROMPTS, 2, SAMPLED)) == _responses(base)
    store = LocalStore(tmp_path / "store")
    publish_weights(trained, store, "jobs/job-a/trainer/weights", tok)
    ray.get(get_or_create_board(APP).announce.remote({"path": "store", "store_url": store.url, "version": 1,
                                                      "prefix": "jobs/job-a/trainer/weights", "owner": "job-a"}))
    got_a = ServeRolloutEngine(standing, min_version_fn=lambda: 1, owner="job-a").generate(PROMPTS, 2, SAMPLED)
    assert _responses(got_a) == _responses(HFRolloutEngine(trained, tok, batch_size=BATCH).generate(PROMPTS, 2,
                                                                                                      SAMPLED))

    # Job b must neither take the app from a running job nor be answered with job a's weights.
    with pytest.raises(Deferred, match="rollout app .* is serving job job-a; this job waits for it to end"):
        standing_rollout.claim(APP, "job-b", jobs)
    with pytest.raises(TimeoutError, match=r"holds weights version 1 of job-a; the request needs >= 0 of job job-b"):
        ServeRolloutEngine(standing, owner="job-b").generate(PROMPTS, 1, SAMPLED)

    # Job a ends: job b takes over and samples the base model again.
    jobs.update("job-a", phase="done")
    standing_rollout.claim(APP, "job-b", jobs)
    assert _responses(ServeRolloutEngine(standing, owner="job-b").generate(PROMPTS, 2, SAMPLED)) == _responses(base)
    assert standing.stats.remote().result()["owner"] == "job-b"
    assert any(e["kind"] == "rollout_claimed" and "(after job-a)" in e["message"] for e in jobs.events("job-b"))

    standing_rollout.release(APP, "job-b")
    assert ray.get(get_or_create_board(APP).owner.remote()) is None


def test_a_missing_standing_app_is_reported_by_name(standing):
    with pytest.raises(InputError, match=r"ray.rollout_app: no running Serve app named nope on the Ray cluster "
                                         r"at local \(not deployed\)"):
        standing_rollout.standing_handle("nope", None)
