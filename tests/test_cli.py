"""`cropi run` end to end on the tiny model, and the CLI's error contract:
bad input -> one clear message on stderr, exit code 2, no traceback."""

import json
from pathlib import Path

import pytest
import yaml

from .conftest import TEST_MODEL
from .conftest import run_cli as cropi

JOB = {
    "name": "cli-test",
    "model": {"path": TEST_MODEL},
    "data": {
        "pool": {"source": "builtin:arith", "size": 64},
        "validation": [{"name": "add1", "source": "builtin:arith?skills=add&digits=1", "size": 16}],
        "untargeted": [{"name": "rev2", "source": "builtin:arith?skills=rev&digits=2", "size": 16}],
    },
    "rollout": {"n": 4, "max_new_tokens": 6},
    "rl": {"batch_prompts": 4},
    "curriculum": {"selector": "full", "stages": 1, "steps_per_stage": 3},
    "eval": {"every": 2},
}


def write_job(tmp_path: Path, job: dict, name: str = "job.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(job))
    return path


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model):
    tmp = tmp_path_factory.mktemp("run")
    result = cropi("run", str(write_job(tmp, JOB)), "--out", str(tmp / "out"))
    return result, tmp / "out"


def test_run_writes_a_complete_run_folder(finished_run):
    result, out = finished_run
    assert result.returncode == 0, result.stderr
    for name in ("spec.yaml", "metrics.jsonl", "summary.json", "curves.png", "checkpoint/config.json"):
        assert (out / name).is_file(), name
    assert any(p.name.startswith("events.out.tfevents") for p in (out / "tb").iterdir())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3]
    # Evaluated before training, every 2 steps and at the end, on both sets.
    assert sorted({r["step"] for r in records if r["kind"] == "eval"}) == [0, 2, 3]
    assert {r["set"]: r["targeted"] for r in records if r["kind"] == "eval"} == {"add1": True, "rev2": False}


def test_run_prints_accuracy_before_and_after(finished_run):
    result, out = finished_run
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["before"]) == set(summary["after"]) == {"add1", "rev2"}
    assert "before" in result.stdout and "after" in result.stdout and "add1" in result.stdout


def test_the_saved_checkpoint_reloads_as_a_model_path(finished_run, tmp_path):
    _, out = finished_run
    job = {**JOB, "name": "from-checkpoint", "model": {"path": str(out / "checkpoint")}}
    job["curriculum"] = {**JOB["curriculum"], "steps_per_stage": 1}
    result = cropi("run", str(write_job(tmp_path, job)), "--out", str(tmp_path / "out2"))
    assert result.returncode == 0, result.stderr


def test_plot_redraws_the_curves(finished_run):
    _, out = finished_run
    (out / "curves.png").unlink()
    result = cropi("plot", str(out))
    assert result.returncode == 0, result.stderr
    assert (out / "curves.png").stat().st_size > 1000


def test_a_different_job_cannot_overwrite_a_run_folder(finished_run, tmp_path):
    _, out = finished_run
    before = (out / "spec.yaml").read_text(), (out / "metrics.jsonl").read_text()
    other = {**JOB, "name": "another-job"}
    result = cropi("run", str(write_job(tmp_path, other)), "--out", str(out))
    assert result.returncode == 2
    assert "different spec" in result.stderr
    assert ((out / "spec.yaml").read_text(), (out / "metrics.jsonl").read_text()) == before


def _bad_jsonl(tmp_path: Path) -> dict:
    data = tmp_path / "pool.jsonl"
    data.write_text('{"prompt": "1+1=", "answer": "2"}\n{"prompt": "2+2="}\n')
    return {**JOB, "data": {**JOB["data"], "pool": {"source": str(data)}}}


BAD_INPUTS = {
    "unknown key": (lambda tmp: {**JOB, "rl": {"learning_rate": 1}}, "rl.learning_rate: unknown field"),
    "wrong type": (lambda tmp: {**JOB, "rollout": {"n": "eight"}}, "rollout.n"),
    "malformed jsonl row": (_bad_jsonl, "line 2: missing field 'answer'"),
    "missing data file": (
        lambda tmp: {**JOB, "data": {**JOB["data"], "pool": {"source": str(tmp / "nope.jsonl")}}}, "nope.jsonl"),
    "missing model path": (lambda tmp: {**JOB, "model": {"path": str(tmp / "no-model")}}, "does not exist"),
    "bad builtin query": (
        lambda tmp: {**JOB, "data": {**JOB["data"], "pool": {"source": "builtin:arith?skills=pow"}}}, "unknown skill"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_exits_2_with_a_clear_message(case, tmp_path):
    make_job, fragment = BAD_INPUTS[case]
    result = cropi("run", str(write_job(tmp_path, make_job(tmp_path))), "--out", str(tmp_path / "out"))
    assert result.returncode == 2, result.stderr
    assert fragment in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_missing_job_file_exits_2(tmp_path):
    result = cropi("run", str(tmp_path / "missing.yaml"))
    assert result.returncode == 2 and "not found" in result.stderr and "Traceback" not in result.stderr


def test_unknown_command_exits_2():
    assert cropi("frobnicate").returncode == 2
