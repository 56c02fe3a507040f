"""`executor: ray`: the same job on the Ray components (projection pool, Ray
Serve rollout service, Ray Train + DeepSpeed ZeRO-3 with weight sync) reaches
the inline executor's selections, and the rollout replicas follow the
trainer's weights through either sync path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from cropi.embedded import run_job
from cropi.runtime.redis_server import free_port
from cropi.spec import parse_spec

from .conftest import TEST_MODEL
from .netutil import wait_for_port
from .services import JOB, LocalCluster, comparable_metrics, stored_selections, submit

pytest.importorskip("ray", reason="the Ray executor needs the `ray` extra")
pytest.importorskip("deepspeed", reason="the Ray trainer needs the `ray` extra (deepspeed)")

RAY_JOB = {**JOB, "executor": "ray",
           "ray": {"projector_actors": 2, "trainer_workers": 2, "rollout_replicas": 1}}


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_a_two_stage_ray_job_selects_what_the_inline_executor_selects(embedded_reference, ray_local, tmp_path):
    result = run_job(parse_spec(RAY_JOB), tmp_path / "run", Console(quiet=True))

    assert result.steps == 6
    got = stored_selections(tmp_path / "run" / "store", JOB["name"])
    want = stored_selections(embedded_reference / "store", JOB["name"])
    assert got == want
    assert got[1]["eligible"] > 0

    # The sharded update differs from the single-process one only in float rounding (the
    # rollouts are the same seeded draws at nearly the same weights), so every record agrees.
    ray_records = comparable_metrics(_records(tmp_path / "run"))
    inline_records = comparable_metrics(_records(embedded_reference))
    assert [(r["kind"], r["step"]) for r in ray_records] == [(r["kind"], r["step"]) for r in inline_records]
    for got_r, want_r in zip(ray_records, inline_records):
        got_r.pop("sync_s", None)
        numbers = {k for k, v in want_r.items() if isinstance(v, float)}
        assert {k: got_r[k] for k in numbers} == pytest.approx({k: want_r[k] for k in numbers}, rel=1e-4, abs=1e-6)
        assert {k: v for k, v in got_r.items() if k not in numbers} == {k: v for k, v in want_r.items()
                                                                         if k not in numbers}
    ray_train = [r for r in _records(tmp_path / "run") if r["kind"] == "train"]
    assert "sync_s" in ray_train[0]
    assert (tmp_path / "run" / "checkpoint" / "config.json").is_file()


def test_a_ray_job_without_ray_extra_settings_uses_defaults():
    spec = parse_spec({"executor": "ray"})
    assert spec.ray.trainer_workers == 2 and spec.ray.zero_stage == 3 and spec.ray.weight_sync == "broadcast"


def test_unknown_ray_settings_are_refused_naming_the_field():
    from cropi.errors import InputError

    with pytest.raises(InputError, match=r"ray\.trainer_gpus_typo: unknown field"):
        parse_spec({"executor": "ray", "ray": {"trainer_gpus_typo": 1}})
    with pytest.raises(InputError, match=r"executor: Input should be 'inline' or 'ray'"):
        parse_spec({"executor": "k8s"})



# Ray's token auth is on by default for a local ray.init() (which writes ~/.ray/auth_token) and then
# for every `ray start` that finds that file; the test cluster and its clients say it is off,
# whatever ran before on the machine.
RAY_ENV = {"RAY_AUTH_MODE": "disabled"}


@dataclass(frozen=True)
class RayHead:
    gcs: str  # host:port, what processes on the head's node (KubeRay's Serve deployer) join
    client: str  # ray://host:port, Ray Client, what the chart's worker pods join


@pytest.fixture
def ray_head(tmp_path):
    """A Ray cluster started the way a KubeRay head starts (`ray start --head --block`), for
    separate processes to join; its ports are chosen so that it runs beside the session's Ray."""
    port = free_port()
    ports = {flag: free_port() for flag in ("--ray-client-server-port", "--dashboard-agent-listen-port",
                                             "--dashboard-agent-grpc-port", "--metrics-export-port")}
    client_port = ports["--ray-client-server-port"]
    log = open(tmp_path / "ray-head.log", "w")
    env = {**os.environ, **RAY_ENV}
    head = subprocess.Popen(
        [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", f"--port={port}", "--num-cpus=6",
         "--include-dashboard=false", "--disable-usage-stats", *(f"{k}={v}" for k, v in ports.items())],
        stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        for listening in (port, client_port):
            wait_for_port(listening, timeout_s=60)
    except TimeoutError as err:
        head.kill()
        pytest.fail(f"{err}; the head's log:\n{(tmp_path / 'ray-head.log').read_text()}")
    yield RayHead(gcs=f"127.0.0.1:{port}", client=f"ray://127.0.0.1:{client_port}")
    head.terminate()
    head.wait(timeout=60)


def _deploy_chart_rollout_app(head: RayHead, values: dict) -> tuple[str, dict[str, str]]:
    """Deploy the Serve app of the chart's RayService on the Ray cluster at `address` as KubeRay does
    from serveConfigV2 (import_path called with the args); returns it and the chart's worker env."""
    from tests.helm_render import render_chart

    objects = render_chart(values)
    service = next(o for o in objects if o["kind"] == "RayService")
    app = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]
    worker = next(o for o in objects if o["kind"] == "Deployment"
                  and o["metadata"]["labels"]["app.kubernetes.io/component"] == "rollout")
    env = {e["name"]: e["value"] for e in worker["spec"]["template"]["spec"]["containers"][0]["env"] if "value" in e}
    deploy = (
        "import importlib, json, sys, ray\n"
        "from ray import serve\n"
        "app = json.loads(sys.argv[1])\n"
        "ray.init(address=sys.argv[2])\n"
        "serve.start(proxy_location='Disabled')\n"
        "module, _, attr = app['import_path'].partition(':')\n"
        "serve.run(getattr(importlib.import_module(module), attr)(app['args']), name=app['name'], route_prefix=None)\n"
    )
    subprocess.run([sys.executable, "-c", deploy, json.dumps(app), head.gcs], check=True, timeout=300,
                   cwd=Path(__file__).resolve().parents[1], env={**os.environ, **RAY_ENV})
    return app["name"], env


def _why_not_done(cluster: LocalCluster, store: Path, statuses: list[dict]) -> str:
    """What a job that did not finish went through (its archived events), and the workers' logs."""
    lines = [str(statuses)]
    for status in statuses:
        if status.get("phase") != "done" and (store / "jobs" / status["name"] / "events.jsonl").is_file():
            lines += [f"{e['kind']}: {e['message']}" for e in _archived_events(store, status["name"])
                      if e["kind"] in ("task_failed", "failed")]
    return "\n".join(lines + [f"--- {n}\n{cluster.log(n)}" for n in ("rollout", "projector", "trainer")])


def _archived_events(store: Path, job: str) -> list[dict]:
    return [json.loads(line) for line in (store / "jobs" / job / "events.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_jobs_take_turns_on_the_charts_standing_rollout_app_and_match_the_inline_run(
        embedded_reference, ray_head, redis_server, tmp_path, tiny_model):
    # One Ray cluster as the chart runs it with ray.rolloutService.enabled: the RayService's standing
    # rollout app, and controller + workers as separate processes joined to it through Ray Client
    # with the chart's env.
    app, chart_env = _deploy_chart_rollout_app(ray_head, {"ray": {"rolloutService": {
        "enabled": True, "modelPath": TEST_MODEL, "replicas": 1, "cpus": 1}}})
    assert chart_env["CROPI_ROLLOUT_APP"] == app
    cluster = LocalCluster(redis_server, str(tmp_path / "store"), tmp_path / "logs", visibility_timeout=120,
                           env={**RAY_ENV, "RAY_ADDRESS": ray_head.client,
                                "CROPI_ROLLOUT_APP": chart_env["CROPI_ROLLOUT_APP"]})
    jobs = [JOB["name"], JOB["name"] + "-next"]
    try:
        cluster.start("controller")
        cluster.start("rollout")
        cluster.start("projector", None, "--parallel", "2")
        cluster.start("trainer")
        for name in jobs:
            submit(cluster, {**RAY_JOB, "name": name})
        statuses = [cluster.wait_phase(name, timeout_s=1200) for name in jobs]
    finally:
        cluster.stop_all()

    assert [(s["phase"], s["step"]) for s in statuses] == [("done", 6), ("done", 6)], _why_not_done(
        cluster, tmp_path / "store", statuses)
    want = stored_selections(embedded_reference / "store", JOB["name"])
    for name in jobs:  # the second job sampled from the base weights again, not the first one's
        assert stored_selections(tmp_path / "store", name) == want
    events = {name: _archived_events(tmp_path / "store", name) for name in jobs}
    claims = {name: [e for e in events[name] if e["kind"] == "rollout_claimed"] for name in jobs}
    for name in jobs:  # one claim each: the replicas went back to the base weights once per job
        assert [e["message"] for e in claims[name]] == [f"rollout app {app}: serving job {name} from the base weights"]
    # The job that came second had its tasks deferred while the first one held the app.
    waited = [name for name in jobs if any(e["kind"] == "task_deferred" for e in events[name])]
    assert len(waited) == 1, waited
    second = waited[0]
    first = next(name for name in jobs if name != second)
    assert any(f"rollout app {app} is serving job {first}" in e["message"] for e in events[second]
               if e["kind"] == "task_deferred")
    assert claims[first][0]["time"] < claims[second][0]["time"]
