"""Issue I part 3, `cropi fetch JOB`: a finished job's results come back through the controller
API (its token and tenancy, no store credentials) into a run folder that `cropi plot` and
`cropi inspect` read as they read a `cropi run` folder.

The job is a real one: a tiny embedded run, whose store folder then backs a real controller app
on a real redis-server, served over HTTP on loopback; `cropi fetch|plot|inspect` run in-process
through the CLI's own entry point (exit codes and messages as a user sees them).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import httpx
import pytest
from rich.console import Console

from cropi.curriculum import layout
from cropi.runtime.jobs import JobRegistry, Phase
from cropi.runtime.queue import TaskBus
from cropi.runtime.store import LocalStore
from cropi.spec import parse_spec
from services.controller.api import create_app
from services.controller.tenancy import DEFAULT_TENANT, Identity, Tenants

from .cli_in_process import run_cropi
from .controller_http import serve_app
from .jobs import tiny_job

OWNER, OTHER = "owner-token-0123456789", "other-token-0123456789"
TENANTS = Tenants({OWNER: Identity(DEFAULT_TENANT), OTHER: Identity("team-b")})
JOB = tiny_job(name="fetch-job", device="cpu",
               curriculum={"selector": "cropi", "stages": 2, "steps_per_stage": 2, "select_ratio": 0.25},
               eval={"every": 2, "samples": 0})


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model):
    from cropi.embedded import run_job

    run_dir = tmp_path_factory.mktemp("fetch-src") / "run"
    run_job(parse_spec(JOB), run_dir, Console(quiet=True))
    return run_dir


def _controller(redis_server, finished_run, tmp_path, report: bool):
    """A controller on a copy of the finished run's store, the job registered and done."""
    store_dir = tmp_path / "store"
    shutil.copytree(finished_run / "store", store_dir)
    store = LocalStore(store_dir)
    if report:  # what a cluster job writes at each stage end: here the run folder's own files
        for name in ("metrics.jsonl", "summary.json", "curves.png"):
            store.put(layout.report_key("fetch-job", name), (finished_run / name).read_bytes())
    else:  # a job of a controller that writes no report
        shutil.rmtree(store_dir / layout.report_prefix("fetch-job"), ignore_errors=True)
    r = redis_server.client()
    app = create_app(TaskBus(r), JobRegistry(r), store, TENANTS, run_loop=False)
    app.state.controller.submit(parse_spec(JOB))
    JobRegistry(r).update("fetch-job", phase=Phase.DONE, status="done")
    return app, store


def cropi(monkeypatch, capsys, *args, token=OWNER, controller=None) -> tuple[int, str]:
    """`cropi ARGS` in this process, as `token` (and at `controller`)."""
    monkeypatch.setenv("CROPI_TOKEN", token)
    if controller:
        monkeypatch.setenv("CROPI_CONTROLLER", controller)
    return run_cropi(monkeypatch, capsys, *args)


def test_fetch_then_plot_and_inspect(redis_server, finished_run, tmp_path, monkeypatch, capsys):
    app, store = _controller(redis_server, finished_run, tmp_path, report=True)
    out = tmp_path / "fetched"
    with serve_app(app) as url:
        code, text = cropi(monkeypatch, capsys, "fetch", "fetch-job", "--out", str(out), controller=url)
        assert code == 0, text
        assert "fetched" in text and "final/checkpoint/config.json" in text and "not stored" not in text
        # Same folder, same job: fetching again is allowed (and replaces the checkpoint).
        code, text = cropi(monkeypatch, capsys, "fetch", "fetch-job", "--out", str(out), controller=url)
        assert code == 0, text
    for name in ("metrics.jsonl", "summary.json", "curves.png"):
        assert (out / name).read_bytes() == (finished_run / name).read_bytes(), name
    for f in (finished_run / "checkpoint").iterdir():
        assert (out / "checkpoint" / f.name).read_bytes() == f.read_bytes(), f.name
    assert (out / "spec.yaml").read_text() == (finished_run / "spec.yaml").read_text()
    assert (out / "events.jsonl").read_bytes() == store.get(layout.events_key("fetch-job"))
    fetched = LocalStore(out / "store")
    for stage in range(2):
        key = layout.selection_key("fetch-job", stage)
        assert fetched.get(key) == store.get(key)
    assert not list((out / "store").rglob("state.pt")) and not list((out / "store").rglob("*.npy"))

    (out / "curves.png").unlink()
    code, text = cropi(monkeypatch, capsys, "plot", str(out))
    assert code == 0 and (out / "curves.png").is_file(), text
    fetched_report = json.loads(inspect_json(out, monkeypatch, capsys))
    from cropi.inspection import inspect_run

    local = inspect_run(finished_run)
    assert [s["prompts"] for s in fetched_report["stages"]] == [s["prompts"] for s in local["stages"]]
    assert fetched_report["stages"][0]["offline_samples"] == local["stages"][0]["offline_samples"]


def inspect_json(out: Path, monkeypatch, capsys) -> str:
    """`cropi inspect OUT --json`'s stdout (it exits 0: no SystemExit)."""
    from services.cli import main

    monkeypatch.setattr(sys, "argv", ["cropi", "inspect", str(out), "--json"])
    capsys.readouterr()
    main()
    return capsys.readouterr().out


def test_without_a_report_fetch_says_so_and_makes_the_metrics(redis_server, finished_run, tmp_path, monkeypatch,
                                                              capsys):
    app, _ = _controller(redis_server, finished_run, tmp_path, report=False)
    out = tmp_path / "fetched"
    with serve_app(app) as url:
        code, text = cropi(monkeypatch, capsys, "fetch", "fetch-job", "--out", str(out), controller=url)
    assert code == 0, text
    assert "not stored (yet): report/metrics.jsonl, report/summary.json, report/curves.png" in text
    assert "metrics.jsonl: made from the stages' step records" in text and "curves.png: drawn here" in text
    made = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    local = [json.loads(line) for line in (finished_run / "metrics.jsonl").read_text().splitlines()]
    assert made == local
    assert cropi(monkeypatch, capsys, "plot", str(out))[0] == 0


def test_another_tenant_cannot_fetch_the_job(redis_server, finished_run, tmp_path, monkeypatch, capsys):
    app, _ = _controller(redis_server, finished_run, tmp_path, report=True)
    out = tmp_path / "fetched"
    with serve_app(app) as url:
        code, text = cropi(monkeypatch, capsys, "fetch", "fetch-job", "--out", str(out), token=OTHER, controller=url)
        assert code == 2 and "no job named 'fetch-job'" in text, text
        for path in ("artifacts", "artifacts/spec.yaml", "artifacts/final/checkpoint/config.json"):
            r = httpx.get(f"{url}/v1/jobs/fetch-job/{path}", headers={"Authorization": f"Bearer {OTHER}"})
            assert r.status_code == 404, path
        code, text = cropi(monkeypatch, capsys, "fetch", "nope", "--out", str(out), controller=url)
        assert code == 2 and "no job named 'nope'" in text, text
    assert not out.exists()


def test_only_the_listed_artifacts_of_the_job_are_served(redis_server, finished_run, tmp_path):
    app, store = _controller(redis_server, finished_run, tmp_path, report=True)
    other = tiny_job(name="other-job")
    store.put(layout.spec_key("other-job"), parse_spec(other).to_yaml().encode())
    auth = {"Authorization": f"Bearer {OWNER}"}
    with serve_app(app) as url:
        listing = httpx.get(f"{url}/v1/jobs/fetch-job/artifacts", headers=auth).json()
        paths = {a["path"]: a["size"] for a in listing["artifacts"]}
        assert listing["phase"] == "done"
        root = layout.job_prefix("fetch-job")
        for path, size in paths.items():
            assert store.size(root + path) == size == len(store.get(root + path))
        assert {"spec.yaml", "events.jsonl", "report/metrics.jsonl", "stages/0/selection.json",
                "stages/1/selection.json", "final/checkpoint/config.json"} <= set(paths)
        assert not [p for p in paths if p.startswith("trainer/") or "/grads/" in p]
        r = httpx.get(f"{url}/v1/jobs/fetch-job/artifacts/final/checkpoint/config.json", headers=auth)
        assert r.status_code == 200 and r.content == store.get(root + "final/checkpoint/config.json")
        refused = ["..%2Fother-job%2Fspec.yaml", "%2E%2E/%2E%2E/jobs/other-job/spec.yaml", "trainer/state.pt",
                   "stages/0/grads/pool/part-00000.npy", "spec.yaml.sha256", "offline/timing.json",
                   "stages/1/checkpoint/config.json", "no/such/thing", "%2Fetc%2Fpasswd"]
        for path in refused:
            r = httpx.get(f"{url}/v1/jobs/fetch-job/artifacts/{path}", headers=auth)
            assert r.status_code == 404, path
            assert "other-job" not in r.text and "passwd" not in r.text


def test_a_folder_of_another_job_is_refused(redis_server, finished_run, tmp_path, monkeypatch, capsys):
    app, _ = _controller(redis_server, finished_run, tmp_path, report=True)
    out = tmp_path / "taken"
    out.mkdir()
    (out / "spec.yaml").write_text(parse_spec(tiny_job(name="someone-else")).to_yaml())
    with serve_app(app) as url:
        code, text = cropi(monkeypatch, capsys, "fetch", "fetch-job", "--out", str(out), controller=url)
    assert code == 2 and "holds a run of a different spec" in text, text
    assert sorted(p.name for p in out.iterdir()) == ["spec.yaml"]
