"""Issue H part 5, submit validates what run validates: each spec below was answered 201 by the
controller and then failed later (the model cases only in a worker, after 48 doomed retries), while
`cropi run` refused it at once. Now:

- the controller refuses them at submit (422, naming the field), as `cropi run` does, and stores nothing;
- a task that fails for its job's input (InputError) is dead-lettered on its first attempt, and the
  job fails as the user's to fix (error_kind input);
- a failed job continues from the stage it failed in (`POST /v1/jobs/{name}/resume`, `cropi resume`);
- `cropi submit` of a job that already failed exits non-zero, saying its phase;
- a service reads a local model folder only under its data roots, as it reads data.

The controller runs in-process on a real redis-server and store folder; `cropi` runs as a process.
"""

from __future__ import annotations

import threading
import time

import pytest
import yaml
from fastapi.testclient import TestClient

from cropi.data.access import DataAccess, set_data_access
from cropi.embedded import run_job
from cropi.errors import InputError
from cropi.models.loading import check_model_path
from cropi.runtime.jobs import JobRegistry, Phase
from cropi.runtime.queue import INPUT_ERROR_MARK, TaskBus
from cropi.runtime.store import LocalStore
from cropi.runtime.tasks import TaskKind
from cropi.runtime.worker import Worker
from cropi.spec import parse_spec
from services.controller.api import create_app

from ..conftest import run_cli
from ..controller_http import serve_app
from ..jobs import tiny_job

TOKEN = "submit-checks-token"


def _bad_file(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"prompt": "1+1=", "answer": "2"}\nnot json at all\n')
    return str(path)


# (what is wrong, spec sections, the field the refusal names)
REFUSED = [
    ("a missing data file", lambda t: {"data": {"pool": {"source": str(t / "missing.parquet")}}}, "missing.parquet"),
    ("a data file that is not data", lambda t: {"data": {"pool": {"source": _bad_file(t), "size": 4}}}, "line 2"),
    ("a template naming no field", lambda t: {"data": {"pool": {"source": "builtin:arith?digits=1", "size": 8,
                                                                "template": "Q: {nothing}"}}}, "data.pool.template"),
    ("a missing model folder", lambda t: {"model": {"path": str(t / "no-model")}}, "model.path"),
    ("an unknown model option", lambda t: {"model": {"path": "builtin:tiny-arith?layerz=2"}}, "model.path"),
    ("an unknown built-in model", lambda t: {"model": {"path": "builtin:huge"}}, "model.path"),
    ("a model folder without config.json", lambda t: {"model": {"path": str(t)}}, "model.path"),
]


def _spec(tmp_path, sections) -> dict:
    job = tiny_job(name="bad")
    for section, value in sections(tmp_path).items():
        job[section] = {**job[section], **value}
    return job


@pytest.fixture
def api(redis_server, tmp_path):
    r = redis_server.client()
    app = create_app(TaskBus(r), JobRegistry(r), LocalStore(tmp_path / "store"), TOKEN, run_loop=False)
    with TestClient(app, headers={"Authorization": f"Bearer {TOKEN}"}) as client:
        client.jobs, client.bus, client.store_dir = JobRegistry(r), TaskBus(r), tmp_path / "store"
        client.controller = app.state.controller
        yield client


@pytest.mark.parametrize("what, sections, field", REFUSED, ids=[c[0] for c in REFUSED])
def test_submit_refuses_what_run_refuses_and_stores_nothing(api, tmp_path, tiny_model, what, sections, field):
    job = _spec(tmp_path, sections)
    r = api.post("/v1/jobs", json={"spec": yaml.safe_dump(job)})
    assert r.status_code == 422, (what, r.text)
    assert field in r.json()["detail"], (what, r.json()["detail"])
    assert api.jobs.names() == [] and not (api.store_dir / "jobs" / "bad").exists()
    # `cropi run` refuses it too, naming the same field, and leaves no run folder.
    with pytest.raises(InputError, match=field.replace(".", r"\.")):
        run_job(parse_spec(job), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_valid_spec_is_still_accepted(api, tiny_model):
    r = api.post("/v1/jobs", json={"spec": yaml.safe_dump(tiny_job(name="good"))})
    assert r.status_code == 201 and r.json()["phase"] == Phase.QUEUED


# ------------------------------------------------------------------ hopeless tasks are not retried
class _RefusingExecutor:
    """Stands in for a worker's executor whose model cannot load: every task raises InputError."""

    calls = 0

    def offline(self, task, ctx):
        type(self).calls += 1
        raise InputError("model.path: cannot load the tokenizer of the model")

    project = train = offline


def _tick_until(api, job: str, phase: str, timeout_s: float = 30) -> None:
    """Tick the stage machine until `job` reaches `phase` (its data loads off the ticking thread)."""
    deadline = time.monotonic() + timeout_s
    while api.jobs.get(job)["phase"] != phase:
        assert time.monotonic() < deadline, f"{job} never reached {phase}"
        api.controller.tick()
        time.sleep(0.01)


def _fail_offline(api) -> None:
    """Submit a job and let a worker meet its first offline task with an InputError."""
    api.post("/v1/jobs", json={"spec": yaml.safe_dump(tiny_job(name="doomed"))})
    _tick_until(api, "doomed", Phase.OFFLINE)  # queued -> offline: its tasks are submitted
    worker = Worker([TaskKind.OFFLINE], api.bus, api.jobs, lambda job: _RefusingExecutor(), "w1")
    task = api.bus.claim(TaskKind.OFFLINE, "w1", block_ms=None)
    worker.process(task)
    return task


def test_a_task_that_fails_for_its_input_is_not_retried_and_fails_the_job_as_input(api, tiny_model):
    _RefusingExecutor.calls = 0
    task = _fail_offline(api)
    assert _RefusingExecutor.calls == 1
    assert api.bus.failure(task.task_id).startswith(INPUT_ERROR_MARK)  # dead-lettered on attempt 1 of 3
    assert api.bus.max_attempts == 3 and task.attempt == 1
    api.controller.tick()
    rec = api.jobs.get("doomed")
    assert rec["phase"] == Phase.FAILED and rec["error_kind"] == "input"
    assert "model.path: cannot load" in rec["error"] and "Traceback" not in rec["error"]


def test_a_failed_job_resumes_from_its_stage_and_its_failed_task_runs_again(api, tiny_model):
    task = _fail_offline(api)
    _tick_until(api, "doomed", Phase.FAILED)
    r = api.post("/v1/jobs/doomed/resume")
    assert r.status_code == 202 and r.json()["phase"] == Phase.QUEUED and r.json()["error"] == ""
    assert api.bus.failure(task.task_id) is None
    _tick_until(api, "doomed", Phase.OFFLINE)  # offline again: the failed part is submitted again
    assert api.bus.claim(TaskKind.OFFLINE, "w2", block_ms=None).task_id is not None
    # Only a failed job continues.
    r = api.post("/v1/jobs/doomed/resume")
    assert r.status_code == 409 and "offline" in r.json()["detail"]


def test_cropi_submit_of_a_job_that_already_failed_exits_non_zero_with_its_phase(api, tmp_path, monkeypatch,
                                                                                 tiny_model):
    _fail_offline(api)
    _tick_until(api, "doomed", Phase.FAILED)
    spec_file = tmp_path / "doomed.yaml"
    spec_file.write_text(yaml.safe_dump(tiny_job(name="doomed")))
    monkeypatch.setenv("CROPI_TOKEN", TOKEN)
    with serve_app(api.app) as url:
        again = run_cli("submit", str(spec_file), "--controller", url)
        assert again.returncode == 1, again.stdout + again.stderr
        assert "is failed" in again.stderr and "cropi resume doomed" in again.stderr
        resumed = run_cli("resume", "doomed", "--controller", url)
        assert resumed.returncode == 0 and "doomed: continuing" in resumed.stdout, resumed.stderr
    assert api.jobs.get("doomed")["phase"] == Phase.QUEUED



# ------------------------------------------------------------------ model folders under the data policy
@pytest.fixture
def service_policy(tmp_path):
    """A service's data policy: one data root (what `cropi serve` sets from CROPI_DATA_ROOTS)."""
    root = tmp_path / "root"
    root.mkdir()
    set_data_access(DataAccess(roots=(str(root),)))
    yield root
    set_data_access(None)


def test_a_service_reads_a_model_folder_only_under_its_data_roots(service_policy, tmp_path, tiny_model):
    outside = tmp_path / "elsewhere"
    (outside / "model").mkdir(parents=True)
    (outside / "model" / "config.json").write_text("{}")
    refusals = []
    for path in (outside / "model", outside / "missing"):
        with pytest.raises(InputError, match="model.path") as err:
            check_model_path(str(path))
        refusals.append(str(err.value).replace(str(path), "<path>"))
    assert refusals[0] == refusals[1]  # the same words whether the folder exists or not
    (service_policy / "model").mkdir()
    with pytest.raises(InputError, match="no config.json"):  # under a root: looked at, and judged
        check_model_path(str(service_policy / "model"))
    check_model_path("Qwen/Qwen3-0.6B")  # a hub id: the workers' to fetch


# ------------------------------------------------------------------ concurrent submits of one name
def test_of_concurrent_submits_of_one_name_the_stored_spec_is_the_accepted_one(api):
    """20 different specs under one name at once: one is accepted, and it is the one that runs."""
    import concurrent.futures

    import httpx

    texts = [yaml.safe_dump(tiny_job(name="race", seed=i)) for i in range(20)]
    with serve_app(api.app) as url, httpx.Client(base_url=url, timeout=60,
                                                 headers={"Authorization": f"Bearer {TOKEN}"}) as http:
        barrier = threading.Barrier(len(texts))

        def submit(text: str) -> int:
            barrier.wait()
            return http.post("/v1/jobs", json={"spec": text}).status_code

        with concurrent.futures.ThreadPoolExecutor(len(texts)) as pool:
            codes = list(pool.map(submit, texts))
    assert sorted(codes) == [201] + [409] * 19
    accepted = parse_spec(yaml.safe_load(texts[codes.index(201)])).to_yaml()
    assert api.jobs.get("race")["spec"] == accepted
    assert (api.store_dir / "jobs" / "race" / "spec.yaml").read_text() == accepted
