"""Killing `cropi run` (SIGKILL, for real) and running it again continues
after the last completed step, with the same selections and metrics as an
uninterrupted run."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import yaml

from .conftest import cli_command, run_cli
from .jobs import tiny_job

JOB = tiny_job(
    name="resume-test",
    data={"pool": {"source": "builtin:arith?digits=1-2", "size": 48},
          "validation": [{"name": "add1", "source": "builtin:arith?skills=add&digits=1", "size": 8}]},
    rollout={"n": 8, "max_new_tokens": 6},
    rl={"batch_prompts": 8, "warmup_steps": 2},
    curriculum={"selector": "learnability", "stages": 2, "steps_per_stage": 6, "select_ratio": 0.5},
    influence=None,
    eval={"every": 4, "samples": 2},
)
TIMING = {"rollout_s", "train_s", "seconds"}  # measurements, not results


def run_args(job: Path, out: Path) -> list[str]:
    return ["run", str(job), "--out", str(out)]


def train_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record["kind"] == "train":
            steps.append(record["step"])
    return steps


def comparable(run_dir: Path) -> tuple[list[dict], list[dict]]:
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    records = [{k: v for k, v in r.items() if k not in TIMING} for r in records]
    stages = run_dir / "store" / "jobs" / JOB["name"] / "stages"
    selections = [json.loads((stages / str(s) / "selection.json").read_text()) for s in range(2)]
    selections = [{k: v for k, v in sel.items() if k not in TIMING} for sel in selections]
    return records, selections


def test_a_killed_run_resumes_and_matches_an_uninterrupted_one(tiny_model, tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(JOB))
    reference = tmp_path / "reference"
    done = run_cli(*run_args(job, reference))
    assert done.returncode == 0, done.stderr

    killed = tmp_path / "killed"
    proc = subprocess.Popen(cli_command(*run_args(job, killed)), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=os.environ.copy())
    deadline = time.time() + 300
    while time.time() < deadline and not any(s >= 3 for s in train_steps(killed)) and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "summary.json").exists(), "the run finished before it could be killed"
    assert 3 <= max(train_steps(killed)) < 12

    resumed = run_cli(*run_args(job, killed))
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout

    steps = train_steps(killed)
    assert steps == list(range(1, 13)), "every step exactly once in the final metrics"
    assert comparable(killed) == comparable(reference)
    ref_summary = json.loads((reference / "summary.json").read_text())
    got_summary = json.loads((killed / "summary.json").read_text())
    assert got_summary["after"] == ref_summary["after"] and got_summary["stages"] == ref_summary["stages"]


def test_restart_discards_progress(tiny_model, tmp_path):
    job = tmp_path / "job.yaml"
    small = {**JOB, "curriculum": {**JOB["curriculum"], "stages": 1, "steps_per_stage": 1}}
    job.write_text(yaml.safe_dump(small))
    out = tmp_path / "run"
    first = run_cli(*run_args(job, out))
    assert first.returncode == 0, first.stderr
    again = run_cli(*run_args(job, out), "--restart")
    assert again.returncode == 0 and "resuming" not in again.stdout
    assert train_steps(out) == [1]
