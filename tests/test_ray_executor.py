"""`executor: ray`: the same job on the Ray components (projection pool, Ray
Serve rollout service, Ray Train + DeepSpeed ZeRO-3 with weight sync) reaches
the inline executor's selections, and the rollout replicas follow the
trainer's weights through either sync path."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console

from cropi.curriculum.runner import run_job
from cropi.runtime.redis_server import free_port
from cropi.spec import parse_spec

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



@pytest.fixture
def ray_head(tmp_path):
    """A Ray cluster started the way a KubeRay head starts (`ray start --head --block`), for
    separate processes to join; its ports are chosen so that it runs beside the session's Ray."""
    port = free_port()
    ports = {flag: free_port() for flag in ("--ray-client-server-port", "--dashboard-agent-listen-port",
                                             "--dashboard-agent-grpc-port", "--metrics-export-port")}
    log = open(tmp_path / "ray-head.log", "w")
    head = subprocess.Popen(
        [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", f"--port={port}", "--num-cpus=6",
         "--include-dashboard=false", "--disable-usage-stats", *(f"{k}={v}" for k, v in ports.items())],
        stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert head.poll() is None, (tmp_path / "ray-head.log").read_text()
            time.sleep(0.5)
    yield f"127.0.0.1:{port}"
    head.terminate()
    head.wait(timeout=60)


@pytest.mark.slow
def test_services_run_a_ray_job_on_a_shared_ray_cluster(embedded_reference, ray_head, redis_server, tmp_path,
                                                        tiny_model):
    # Controller + three workers as separate processes; the workers hand the job's tasks to the
    # Ray cluster they all join (RAY_ADDRESS), as pods of the chart do.
    cluster = LocalCluster(redis_server, str(tmp_path / "store"), tmp_path / "logs", env={"RAY_ADDRESS": ray_head},
                           visibility_timeout=120)
    try:
        cluster.start("controller")
        cluster.start("rollout")
        cluster.start("projector", None, "--parallel", "2")
        cluster.start("trainer")
        submit(cluster, RAY_JOB)
        status = cluster.wait_phase(JOB["name"], timeout_s=900)
    finally:
        cluster.stop_all()
    assert status["phase"] == "done", status
    assert status["step"] == 6
    assert stored_selections(tmp_path / "store", JOB["name"]) == stored_selections(embedded_reference / "store",
                                                                                 JOB["name"])
