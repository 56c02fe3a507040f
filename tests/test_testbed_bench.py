"""`cropi bench testbed`: the selector-free criteria that fix the testbed before selectors are compared."""

import json

import pytest
from rich.console import Console

from cropi.bench.testbed import arm_spec, run_testbed_bench, skill_split, verdict
from cropi.errors import InputError
from cropi.spec import parse_spec

from .conftest import TEST_MODEL, run_cli

JOB = {
    "name": "tb",
    "model": {"path": TEST_MODEL},
    "data": {"pool": {"source": "builtin:arith?digits=1-2&noise=0.05", "size": 40},
             "validation": [{"name": "rev2", "source": "builtin:arith?skills=rev&digits=2", "size": 6},
                            {"name": "sort2", "source": "builtin:arith?skills=sort&digits=2", "size": 6}],
             "untargeted": [{"name": "max1", "source": "builtin:arith?skills=max&digits=1", "size": 6}]},
    "rollout": {"n": 2, "max_new_tokens": 4},
    "rl": {"batch_prompts": 2},
    "eval": {"samples": 2},
}


def test_targeted_skills_come_from_the_validation_sets_and_the_rest_of_the_pool_is_unrelated():
    spec = parse_spec(JOB)
    assert skill_split(spec) == (("rev", "sort"), ("add", "sub", "mul", "max"))
    tgt = arm_spec(spec, "targeted_skills", seed=1, steps=10)
    unr = arm_spec(spec, "unrelated_skills", seed=1, steps=10)
    assert tgt.data.pool.source == "builtin:arith?skills=rev,sort&digits=1-2&noise=0.05"
    assert unr.data.pool.source == "builtin:arith?skills=add,sub,mul,max&digits=1-2&noise=0.05"
    for s in (tgt, unr, arm_spec(spec, "full", 1, 10)):
        assert s.curriculum.selector == "full" and s.total_steps == 10 and s.seed == 1


def test_a_file_pool_or_an_all_targeted_pool_is_refused():
    with pytest.raises(InputError, match="data.pool.source"):
        skill_split(parse_spec({**JOB, "data": {**JOB["data"], "pool": {"source": "pool.jsonl"}}}))
    with pytest.raises(InputError, match="every pool skill is targeted"):
        skill_split(parse_spec({**JOB, "data": {**JOB["data"], "pool": {"source": "builtin:arith?skills=rev"}}}))


def row(base_greedy, base_pass, full, tgt, unr, untargeted_change):
    """One seed: (before, after) greedy pairs per arm on a single targeted set `t`, untargeted `u`."""
    def arm(before, after, u_change=0.0):
        return {"before": {"t": {"accuracy": before}, "u": {"accuracy": 0.5}},
                "after": {"t": {"accuracy": after}, "u": {"accuracy": 0.5 + u_change}}}
    return {"base": {"t": {"accuracy": base_greedy, "pass_at_k": base_pass}},
            "arms": {"full": arm(*full, untargeted_change), "targeted_skills": arm(*tgt), "unrelated_skills": arm(*unr)}}


def test_verdict_by_hand_all_criteria_met():
    rows = [row(0.2, 0.8, (0.2, 0.5), (0.2, 0.6), (0.2, 0.25), 0.0),
            row(0.2, 0.6, (0.2, 0.4), (0.2, 0.5), (0.2, 0.2), -0.01)]
    v = verdict(rows, ["t"], ["u"])
    c = v["criteria"]
    assert c["greedy_rises"]["value"]["mean"] == pytest.approx(0.25) and c["greedy_rises"]["met"]
    assert c["latent_capability"]["value"] == pytest.approx(0.7 / 0.2) and c["latent_capability"]["met"]
    # unrelated gain 0.025 vs targeted-skills gain 0.35: a share of 1/14.
    assert c["skill_specific"]["value"] == pytest.approx(0.025 / 0.35) and c["skill_specific"]["met"]
    assert c["untargeted_hold"]["value"]["u"]["mean"] == pytest.approx(-0.005) and c["untargeted_hold"]["met"]
    assert v["all_met"]


@pytest.mark.parametrize("rows, failed", [
    ([row(0.2, 0.8, (0.2, 0.6), (0.2, 0.6), (0.2, 0.2), 0.0), row(0.2, 0.8, (0.2, 0.15), (0.2, 0.6), (0.2, 0.2), 0.0)],
     "greedy_rises"),  # mean +0.175, but one seed fell
    ([row(0.3, 0.5, (0.3, 0.6), (0.3, 0.6), (0.3, 0.3), 0.0)] * 2, "latent_capability"),  # pass@8 only 1.7x
    ([row(0.2, 0.8, (0.2, 0.6), (0.2, 0.5), (0.2, 0.35), 0.0)] * 2, "skill_specific"),  # half the gain transfers
    ([row(0.2, 0.8, (0.2, 0.6), (0.2, 0.6), (0.2, 0.2), -0.03)] * 2, "untargeted_hold"),
])
def test_verdict_names_the_criterion_that_fails(rows, failed):
    v = verdict(rows, ["t"], ["u"])
    assert [k for k, c in v["criteria"].items() if not c["met"]] == [failed]
    assert not v["all_met"]


def test_bench_runs_every_arm_per_seed_and_resumes(tmp_path, tiny_model, mixed_rewards):
    job = tmp_path / "job.yaml"
    job.write_text(json.dumps(JOB))
    report = run_testbed_bench(job, seeds=1, out=tmp_path / "out", console=Console(quiet=True), steps=2)
    saved = json.loads((tmp_path / "out" / "testbed.json").read_text())
    assert saved["criteria"].keys() == report["criteria"].keys() and saved["steps"] == 2
    assert set(saved["per_seed"][0]["arms"]) == {"full", "targeted_skills", "unrelated_skills"}
    assert "pass_at_k" in saved["per_seed"][0]["base"]["rev2"]
    # Every arm's run folder is kept: a second call resumes (finishes at once) and reports the same.
    again = run_testbed_bench(job, seeds=1, out=tmp_path / "out", console=Console(quiet=True), steps=2)
    assert again["criteria"] == report["criteria"]


def test_cli_refuses_a_job_without_targeted_sets(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text(json.dumps({**JOB, "data": {**JOB["data"], "validation": []}}))
    result = run_cli("bench", "testbed", "--job", str(job), "--out", str(tmp_path / "o"))
    assert result.returncode == 2 and "data.validation is empty" in result.stderr
