"""`executor: ray`: the same job on the Ray components (projection pool, Ray
Serve rollout service, Ray Train + DeepSpeed ZeRO-3 with weight sync) reaches
the inline executor's selections, and the rollout replicas follow the
trainer's weights through either sync path."""

from __future__ import annotations

import json

import pytest
from rich.console import Console

from cropi.curriculum.runner import run_job
from cropi.spec import parse_spec

from .services import JOB, comparable_metrics, stored_selections

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
        assert got_r == pytest.approx(want_r, rel=1e-4, abs=1e-6), (got_r, want_r)
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

