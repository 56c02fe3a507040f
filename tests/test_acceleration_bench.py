"""`cropi bench acceleration`: every selector on the same schedule and seeds,
shared offline work charged to each selector, and the paper's arithmetic."""

import json

import pytest
from rich.console import Console

from cropi.bench.acceleration import (
    SELECTORS,
    Schedule,
    run_acceleration_bench,
    run_record,
    summarize,
)
from cropi.curriculum.runner import run_job
from cropi.spec import load_spec, parse_spec

from .conftest import TEST_MODEL, run_cli

TINY = Schedule(seeds=1, stages=2, steps_per_stage=2, eval_every=2)


def write_job(path):
    path.write_text(json.dumps({
        "name": "accel-test",
        "model": {"path": TEST_MODEL},
        "data": {
            "pool": {"source": "builtin:arith?digits=1-2", "size": 40},
            "validation": [{"name": "add1", "source": "builtin:arith?skills=add&digits=1", "size": 8}],
            "untargeted": [{"name": "max1", "source": "builtin:arith?skills=max&digits=1", "size": 8}],
        },
        "rollout": {"n": 4, "max_new_tokens": 4},
        "offline": {"n_pool": 4, "n_valid": 4},
        "rl": {"batch_prompts": 2},
        "curriculum": {"select_ratio": 0.25},
        "influence": {"proj_dim": 128, "max_valid_prompts": 4},
        "eval": {"samples": 2},
    }))
    return path


@pytest.fixture(scope="module")
def bench(tmp_path_factory, tiny_model):
    # Module-scoped so the six runs happen once; the reward stand-in is set by hand
    # (monkeypatch is function-scoped). Same stand-in as conftest.mixed_rewards.
    mp = pytest.MonkeyPatch()
    fake = lambda p, text: float(sum(map(ord, text)) % 3 == 0)  # noqa: E731
    for target in ("cropi.influence.offline.reward", "cropi.curriculum.policy.reward", "cropi.evaluation.reward"):
        mp.setattr(target, fake)
    out = tmp_path_factory.mktemp("accel")
    job = write_job(out / "job.yaml")
    report = run_acceleration_bench(job, out, Console(quiet=True), schedule=TINY)
    yield out, report
    mp.undo()


def test_report_has_the_issue_fields_for_every_selector(bench):
    out, report = bench
    saved = json.loads((out / "acceleration.json").read_text())
    assert saved == json.loads(json.dumps(report))
    assert (out / "acceleration.png").stat().st_size > 10_000
    assert set(saved["selectors"]) == set(SELECTORS)
    for entry in saved["selectors"].values():
        for field in ("steps_to_target", "step_acceleration", "wallclock_acceleration", "final_targeted",
                      "final_untargeted", "curves"):
            assert field in entry
        assert entry["curves"]["steps"] == [0, 2, 4]


def test_target_is_full_final_accuracy_and_full_accelerates_itself_by_one(bench):
    _, report = bench
    full = report["selectors"]["full"]
    assert report["target"] == pytest.approx(full["final_targeted"]["mean"])
    # full's curve reaches its own final value at the last step at the latest.
    assert full["steps_to_target"] <= 4
    if full["steps_to_target"] > 0:
        assert full["step_acceleration"] == 1.0
        assert full["wallclock_acceleration"] == pytest.approx(1.0)
    else:  # on target before training: nothing to accelerate, reported as None
        assert full["step_acceleration"] is None


def test_shared_offline_work_is_identical_and_charged_to_each_selector(bench):
    out, report = bench
    seed = out / "seed-0"
    offline = "store/jobs/accel-test-accel/offline/pool"
    reference = sorted(p.read_bytes() for p in (seed / "cropi" / offline).glob("*.parquet"))
    for name in ("influence_once", "learnability", "pass_rate"):
        assert sorted(p.read_bytes() for p in (seed / name / offline).glob("*.parquet")) == reference
        assert report["selectors"][name]["offline_s"] == report["selectors"]["cropi"]["offline_s"] > 0
    for name in ("full", "random"):
        assert report["selectors"][name]["offline_s"] == 0
        assert not (seed / name / "store/jobs/accel-test-accel/offline").exists()
    # influence_once's stage 0 is cropi's stage 0 (same policy), and it pays for it once.
    sel = lambda name, s: json.loads(  # noqa: E731
        (seed / name / f"store/jobs/accel-test-accel/stages/{s}/selection.json").read_text())
    assert sel("influence_once", 0)["prompt_ids"] == sel("cropi", 0)["prompt_ids"]
    assert sel("influence_once", 1)["prompt_ids"] == sel("influence_once", 0)["prompt_ids"]
    assert sel("influence_once", 0)["seconds"] == sel("cropi", 0)["seconds"] > 0
    assert sel("influence_once", 1)["seconds"] == 0


def test_shared_stage_zero_equals_a_fresh_influence_once_run(bench, tmp_path, mixed_rewards):
    out, _ = bench
    spec = load_spec(out / "seed-0" / "influence_once" / "spec.yaml")
    run_job(spec, tmp_path / "fresh", Console(quiet=True))
    fresh = json.loads((tmp_path / "fresh" / f"store/jobs/{spec.name}/stages/0/selection.json").read_text())
    shared = json.loads((out / "seed-0" / "influence_once" /
                         f"store/jobs/{spec.name}/stages/0/selection.json").read_text())
    assert fresh["prompt_ids"] == shared["prompt_ids"]


def test_wallclock_counts_offline_selection_and_steps_but_not_evaluation(tmp_path):
    from cropi.runtime.store import LocalStore

    spec = parse_spec({"name": "w", "curriculum": {"selector": "cropi", "stages": 2, "steps_per_stage": 2}})
    run = tmp_path / "run"
    run.mkdir()
    lines = [{"kind": "eval", "step": 0, "set": "x", "sampled_accuracy": 0.1}]
    for step in (1, 2, 3, 4):
        lines.append({"kind": "train", "step": step, "rollout_s": 1.0, "train_s": 2.0})
        if step % 2 == 0:
            lines.append({"kind": "eval", "step": step, "set": "x", "sampled_accuracy": 0.1 * step})
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    store = LocalStore(run / "store")
    store.put("jobs/w/offline/timing.json", b'{"seconds": 10.0}')
    store.put("jobs/w/stages/0/selection.json", b'{"seconds": 5.0}')
    store.put("jobs/w/stages/1/selection.json", b'{"seconds": 7.0}')
    spec.data.validation = []  # targeted_mean over no sets is irrelevant here
    record = run_record(run, spec, "sampled_accuracy")
    assert record["steps"] == [0, 2, 4]
    # step 2: offline 10 + stage 0 selection 5 + 2 steps x 3 s; step 4: + stage 1 selection 7 + 2 x 3 s
    assert record["wallclock_s"] == [0.0, 21.0, 34.0]


def curve(values, wall=None):
    steps = [0, 10, 20, 30, 40]
    return {"steps": steps, "targeted": values, "untargeted": [0.5] * 5,
            "wallclock_s": wall or [0, 10, 20, 30, 40], "offline_s": 0.0, "selection_s": [0.0]}


def test_summary_follows_the_paper_definition():
    per_seed = {
        "full": [curve([0.1, 0.2, 0.3, 0.35, 0.40]), curve([0.1, 0.2, 0.3, 0.38, 0.40])],
        # reaches 0.40 (the target) on the seed mean at step 20; its wall-clock per step is doubled
        "cropi": [curve([0.1, 0.3, 0.41, 0.4, 0.45], [0, 20, 40, 60, 80]),
                  curve([0.1, 0.3, 0.39, 0.4, 0.45], [0, 20, 40, 60, 80])],
        "random": [curve([0.1, 0.1, 0.2, 0.2, 0.3])] * 2,
    }
    report = summarize(per_seed, "sampled_accuracy")
    assert report["target"] == pytest.approx(0.40)
    s = report["selectors"]
    assert s["full"]["steps_to_target"] == 40
    assert s["cropi"]["steps_to_target"] == 20
    assert s["cropi"]["step_acceleration"] == 2.0
    assert s["cropi"]["wallclock_acceleration"] == pytest.approx(40 / 40)
    assert s["random"]["steps_to_target"] is None and s["random"]["step_acceleration"] is None
    assert s["cropi"]["final_targeted"]["mean"] == pytest.approx(0.45)


@pytest.mark.parametrize("args, message", [
    (["--selector", "bogus"], "unknown bogus"),
    (["--selector", "cropi"], "'full' must be included"),
    (["--metric", "loss"], "--metric"),
])
def test_bad_bench_options_exit_2_naming_the_option(args, message, tmp_path):
    job = write_job(tmp_path / "job.yaml")
    result = run_cli("bench", "acceleration", "--job", str(job), "--out", str(tmp_path / "o"), *args)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr + result.stdout
    assert not (tmp_path / "o").exists()
