"""`cropi bench acceleration`: every selector on the same schedule and seeds,
shared offline work charged to each selector, and the paper's arithmetic."""

import json
import shutil

import pytest
from rich.console import Console

from cropi.bench.acceleration import (
    SELECTORS,
    Schedule,
    run_acceleration_bench,
    run_record,
    summarize,
)
from cropi.data.rewards import register_verifier
from cropi.embedded import run_job
from cropi.spec import load_spec, parse_spec

from .conftest import run_cli, stand_in_verifier
from .jobs import tiny_job

TINY = Schedule(seeds=2, stages=2, steps_per_stage=2, full_steps=6, eval_every=2)


def write_job(path):
    path.write_text(json.dumps(tiny_job(
        name="accel-test",
        data={"pool": {"source": "builtin:arith?digits=1-2", "size": 40},
              "validation": [{"name": "add1", "source": "builtin:arith?skills=add&digits=1", "size": 8}],
              "untargeted": [{"name": "max1", "source": "builtin:arith?skills=max&digits=1", "size": 8}]},
        curriculum={"select_ratio": 0.25},
        eval={"samples": 2},
    )))
    return path


@pytest.fixture(scope="module")
def bench(tmp_path_factory, tiny_model):
    # Module-scoped so the six runs happen once, on the stand-in verifier of conftest.mixed_rewards.
    out = tmp_path_factory.mktemp("accel")
    job = write_job(out / "job.yaml")
    with register_verifier("int", stand_in_verifier):
        report = run_acceleration_bench(job, out, Console(quiet=True), schedule=TINY)
    yield out, report


def test_report_has_the_protocol_fields_for_every_selector(bench):
    out, report = bench
    saved = json.loads((out / "acceleration.json").read_text())
    assert saved == json.loads(json.dumps(report))
    assert (out / "acceleration.png").stat().st_size > 10_000
    assert set(saved["selectors"]) == set(SELECTORS)
    assert set(saved["levels"]) == {"50%", "75%", "90%"}
    for name, entry in saved["selectors"].items():
        for field in ("paper", "neutral", "gain_area", "area_ratio", "area_ratio_interval90", "final_targeted",
                      "final_untargeted", "curves"):
            assert field in entry
        assert set(entry["neutral"]) == {"50%", "75%", "90%"}
        # full runs its longer budget; every other selector the stage schedule.
        assert entry["curves"]["steps"] == ([0, 2, 4, 6] if name == "full" else [0, 2, 4])
    assert set(saved["cropi_minus"]) == set(SELECTORS) - {"cropi"}
    for d in saved["cropi_minus"].values():
        assert d["verdict"] in ("tie", "cropi ahead", "cropi behind")


def test_finished_runs_are_read_back_from_their_records_not_rerun(bench, monkeypatch, tmp_path):
    out, report = bench
    # Only the small records travel (e.g. to the next session); the run folders stay behind.
    shutil.copytree(out / "records", tmp_path / "records")
    shutil.copy(out / "job.yaml", tmp_path / "job.yaml")
    monkeypatch.setattr("cropi.bench.acceleration.run_job", lambda *a, **k: pytest.fail("reran a finished run"))
    again = run_acceleration_bench(tmp_path / "job.yaml", tmp_path, Console(quiet=True), schedule=TINY)
    assert again["selectors"] == report["selectors"]


def test_a_record_of_another_schedule_is_not_reused(bench, tmp_path):
    out, _ = bench
    shutil.copytree(out / "records", tmp_path / "records")
    shutil.copy(out / "job.yaml", tmp_path / "job.yaml")
    other = Schedule(seeds=2, stages=1, steps_per_stage=2, full_steps=6, eval_every=2)
    report = run_acceleration_bench(tmp_path / "job.yaml", tmp_path, Console(quiet=True), schedule=other,
                                    selectors=["random", "full"])
    assert report["selectors"]["random"]["curves"]["steps"] == [0, 2]


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
    steps = [0, 10, 20, 30, 40][: len(values)]
    return {"steps": steps, "targeted": values, "untargeted": [0.5] * len(values),
            "wallclock_s": wall or steps, "offline_s": 0.0, "selection_s": [0.0]}


def test_summary_by_hand():
    per_seed = {
        # full runs 40 steps; seed mean 0.1, 0.2, 0.3, 0.365, 0.40: final gain 0.3 over the base 0.1.
        "full": [curve([0.1, 0.2, 0.3, 0.35, 0.40]), curve([0.1, 0.2, 0.3, 0.38, 0.40])],
        # the selectors run 20 steps; cropi's seed mean is 0.1, 0.3, 0.4 and its wall-clock per step doubled.
        "cropi": [curve([0.1, 0.3, 0.41], [0, 20, 40]), curve([0.1, 0.3, 0.39], [0, 20, 40])],
        "random": [curve([0.1, 0.1, 0.2])] * 2,
    }
    report = summarize(per_seed, "accuracy", budget=20)
    assert report["base"] == pytest.approx(0.1) and report["full_final"] == pytest.approx(0.4)
    assert report["levels"]["75%"] == pytest.approx(0.325)
    s = report["selectors"]
    # Paper: cropi's final level 0.40; full gets there at 40, cropi at 20.
    assert s["cropi"]["paper"]["target"] == pytest.approx(0.40)
    assert s["cropi"]["paper"]["full_steps"] == pytest.approx(40)
    assert s["cropi"]["paper"]["acceleration"] == pytest.approx(2.0)
    # Neutral 75 % (0.325): full at 20 + 10 * 0.025 / 0.065; cropi at 10 + 10 * 0.025 / 0.1 = 12.5.
    n75 = s["cropi"]["neutral"]["75%"]
    assert n75["steps"] == pytest.approx(12.5)
    assert n75["acceleration"] == pytest.approx((20 + 10 * 0.025 / 0.065) / 12.5)
    assert n75["wallclock_acceleration"] == pytest.approx((20 + 10 * 0.025 / 0.065) / 25)
    assert s["random"]["neutral"]["75%"]["steps"] is None and s["random"]["neutral"]["75%"]["acceleration"] is None
    # Gain areas over 20 steps: full (0 + 0.1) / 2 + (0.1 + 0.2) / 2 = 0.2 -> /2 = 0.1; cropi 0.2 + 0.5 = 0.35/2 = 0.175.
    assert s["full"]["gain_area"] == pytest.approx(0.1)
    assert s["cropi"]["gain_area"] == pytest.approx(0.175)
    assert s["cropi"]["area_ratio"] == pytest.approx(1.75)
    assert report["cropi_minus"]["random"]["gain_area_difference"] == pytest.approx(0.175 - 0.025)
    # random is worse than cropi on both seeds, by a spread-out amount: the interval lies above 0.
    assert report["cropi_minus"]["random"]["interval90"][0] > 0
    assert report["cropi_minus"]["random"]["verdict"] == "cropi ahead"
    assert s["cropi"]["final_targeted"]["mean"] == pytest.approx(0.40)


def test_a_difference_inside_the_noise_is_a_tie():
    per_seed = {
        "full": [curve([0.1, 0.2, 0.3]), curve([0.1, 0.2, 0.3])],
        "cropi": [curve([0.1, 0.3, 0.3]), curve([0.1, 0.1, 0.2])],
        "random": [curve([0.1, 0.1, 0.2]), curve([0.1, 0.3, 0.3])],
    }
    assert summarize(per_seed, "accuracy", budget=20)["cropi_minus"]["random"]["verdict"] == "tie"


@pytest.mark.parametrize("args, message", [
    (["--selector", "bogus"], "unknown bogus"),
    (["--selector", "cropi"], "'full' must be included"),
    (["--metric", "loss"], "--metric"),
    (["--seeds", "1"], "--seeds"),
])
def test_bad_bench_options_exit_2_naming_the_option(args, message, tmp_path):
    job = write_job(tmp_path / "job.yaml")
    result = run_cli("bench", "acceleration", "--job", str(job), "--out", str(tmp_path / "o"), *args)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr + result.stdout
    assert not (tmp_path / "o").exists()


def test_records_of_selectors_without_influence_ignore_the_influence_settings():
    from cropi.bench.acceleration import record_key

    a = parse_spec({"curriculum": {"selector": "random"}})
    b = parse_spec({"curriculum": {"selector": "random"}, "influence": {"logprob_temperature": 1.0}})
    assert record_key(a) == record_key(b)
    c = parse_spec({"curriculum": {"selector": "cropi"}})
    d = parse_spec({"curriculum": {"selector": "cropi"}, "influence": {"logprob_temperature": 1.0}})
    assert record_key(c) != record_key(d)
