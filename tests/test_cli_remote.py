"""`cropi submit|status|list|cancel|logs` against a running controller
(a `cropi serve` process on a real Redis), and their errors."""

import json
import os
import subprocess

import httpx
import pytest
import yaml

from cropi.runtime.redis_server import free_port

from .conftest import cli_command
from .jobs import tiny_job
from .services import TOKEN

SMALL = tiny_job(
    name="cli-job",
    data={"pool": {"source": "builtin:arith?digits=1", "size": 16},
          "validation": [{"name": "add1", "source": "builtin:arith?skills=add&digits=1", "size": 4}]},
    rollout={"n": 2, "max_new_tokens": 4},
    offline=None,
    curriculum={"selector": "full", "stages": 1, "steps_per_stage": 2},
    influence=None,
    eval={"every": 2, "samples": 0},
)

def cropi(*args, controller=None, token=TOKEN, cwd=None):
    env = {k: v for k, v in os.environ.items() if k not in ("CROPI_CONTROLLER", "CROPI_TOKEN", "CROPI_TOKEN_FILE")}
    if controller:
        env["CROPI_CONTROLLER"] = controller
    if token:
        env["CROPI_TOKEN"] = token
    return subprocess.run(cli_command(*args), capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


@pytest.fixture
def job_file(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(SMALL))
    return path


def test_submit_wait_then_status_list_and_logs(cluster, job_file):
    cluster.start("controller")
    metrics_port = free_port()
    cluster.start("trainer", "trainer", "--metrics-port", str(metrics_port))
    r = cropi("submit", str(job_file), "--wait", controller=cluster.url)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "submitted cli-job" in r.stdout and "cli-job: done" in r.stdout
    st = json.loads(cropi("status", "cli-job", "--json", controller=cluster.url).stdout)
    assert (st["phase"], st["step"], st["total_steps"]) == ("done", 2, 2)
    assert "cli-job" in cropi("list", controller=cluster.url).stdout
    log = cropi("logs", "cli-job", controller=cluster.url).stdout
    for kind in ("submitted", "stage_started", "selected", "eval", "stage_done", "done"):
        assert kind in log, log
    metrics = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").text
    assert 'cropi_tasks_total{kind="train",outcome="succeeded"} 1.0' in metrics
    assert 'cropi_trainer_step{job="cli-job"} 2.0' in metrics
    assert 'cropi_queue_depth{kind="train",state="pending"} 0.0' in metrics


def test_cancel_stops_a_job(cluster, job_file):
    cluster.start("controller")  # no trainer: the job waits in its train phase
    assert cropi("submit", str(job_file), controller=cluster.url).returncode == 0
    cluster.wait_phase("cli-job", until=lambda st: st.get("phase") == "train")
    r = cropi("cancel", "cli-job", controller=cluster.url)
    assert r.returncode == 0 and "cancel requested" in r.stdout
    assert cluster.wait_phase("cli-job")["phase"] == "cancelled"


@pytest.mark.parametrize("args, env, code, message", [
    (["status"], {"controller": None}, 2, "CROPI_CONTROLLER"),
    (["status"], {"token": None}, 2, "CROPI_TOKEN"),
    (["status"], {"token": "wrong"}, 2, "refused the token"),
    (["status", "nope"], {}, 2, "no job named 'nope'"),
    (["cancel", "nope"], {}, 2, "no job named 'nope'"),
    (["status"], {"controller": "localhost:8080"}, 2, "not an http(s) URL"),
    (["status"], {"controller": "http://127.0.0.1:9"}, 1, "unreachable"),
    (["serve", "scheduler"], {}, 2, "unknown service 'scheduler'"),
])
def test_cli_errors_name_the_problem(cluster, args, env, code, message):
    cluster.start("controller")
    kwargs = {"controller": cluster.url, "token": TOKEN}
    kwargs.update(env)
    r = cropi(*args, **kwargs)
    assert r.returncode == code, r.stdout + r.stderr
    assert message in r.stderr + r.stdout


def test_a_bad_spec_file_is_refused_before_anything_is_sent(cluster, tmp_path):
    cluster.start("controller")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nrl:\n  lr: fast\n")
    r = cropi("submit", str(bad), controller=cluster.url)
    assert r.returncode == 2 and "rl.lr" in r.stderr and str(bad) in r.stderr and "line 3" in r.stderr
    with cluster.client() as c:
        assert c.get("/v1/jobs").json() == []
