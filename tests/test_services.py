"""The services end to end: controller, rollout, projector and trainer as
separate processes on a real redis-server and a shared store folder reach the
same selections and the same training metrics as `cropi run`."""

import json

import pytest
import yaml
from rich.console import Console

from cropi.curriculum.runner import run_job
from cropi.runtime.jobs import JobRegistry
from cropi.spec import parse_spec

from .conftest import TEST_MODEL
from .services import LocalCluster

JOB = {
    "name": "svc-e2e",
    "model": {"path": TEST_MODEL},
    "data": {
        # 1-digit max/add: the barely trained test model solves a few of them
        # sometimes, which gives mixed rewards (eligible prompts) without a stand-in verifier.
        "pool": {"source": "builtin:arith?skills=max,add&digits=1", "size": 48},
        "validation": [{"name": "max1", "source": "builtin:arith?skills=max&digits=1", "size": 16}],
    },
    "rollout": {"n": 8, "max_new_tokens": 4},
    "offline": {"n_pool": 8, "n_valid": 16},
    "rl": {"batch_prompts": 4, "warmup_steps": 2},
    "curriculum": {"selector": "cropi", "stages": 2, "steps_per_stage": 3, "select_ratio": 0.25},
    "influence": {"proj_dim": 256, "max_valid_prompts": 16},
    "eval": {"every": 2, "samples": 2},
}
TIMING = {"rollout_s", "train_s", "seconds"}


def comparable_metrics(records):
    return [{k: v for k, v in r.items() if k not in TIMING and k != "stage"} for r in records]


def stored_selections(store_root, job, stages=2):
    out = []
    for s in range(stages):
        sel = json.loads((store_root / "jobs" / job / "stages" / str(s) / "selection.json").read_text())
        sel.pop("seconds")
        out.append(sel)
    return out


@pytest.fixture(scope="module")
def embedded_reference(tmp_path_factory, tiny_model):
    run_dir = tmp_path_factory.mktemp("embedded")
    run_job(parse_spec(JOB), run_dir, Console(quiet=True))
    return run_dir


@pytest.fixture
def cluster(redis_server, tmp_path, tiny_model):
    c = LocalCluster(redis_server, str(tmp_path / "store"), tmp_path / "logs")
    yield c
    c.stop_all()


def submit(cluster, job=JOB) -> None:
    with cluster.client() as c:
        r = c.post("/v1/jobs", json={"spec": yaml.safe_dump(job)})
    assert r.status_code == 201, r.text


def test_services_reach_the_embedded_runs_selections_and_metrics(cluster, embedded_reference, tmp_path,
                                                                   redis_server):
    cluster.start_all()
    submit(cluster)
    status = cluster.wait_phase(JOB["name"])
    assert status["phase"] == "done", status
    assert status["step"] == 6

    got = stored_selections(tmp_path / "store", JOB["name"])
    want = stored_selections(embedded_reference / "store", JOB["name"])
    assert got == want
    assert got[0]["eligible"] > 0, "the test job must have something to select"

    service_metrics = []
    for s in range(2):
        path = tmp_path / "store" / "jobs" / JOB["name"] / "stages" / str(s) / "metrics.jsonl"
        service_metrics += [json.loads(line) for line in path.read_text().splitlines()]
    embedded = [json.loads(line) for line in (embedded_reference / "metrics.jsonl").read_text().splitlines()]
    assert comparable_metrics(service_metrics) == comparable_metrics(embedded)

    counts = JobRegistry(redis_server.client()).step_counts(JOB["name"])
    assert counts == {step: 1 for step in range(1, 7)}, "every training step exactly once"
