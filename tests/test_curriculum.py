"""The staged curriculum in `cropi run`: selection per stage, recorded in the store."""

import json

import pytest
from rich.console import Console

from cropi.embedded import run_job
from cropi.spec import parse_spec

from .jobs import tiny_job


def job(selector: str) -> dict:
    return tiny_job(name=f"cur-{selector.replace('_', '-')}",
                    curriculum={"selector": selector, "stages": 2, "steps_per_stage": 2, "select_ratio": 0.25})


def selections(run_dir, name):
    """The recorded selections without their compute time (a measurement, not part of the choice)."""
    base = run_dir / "store" / "jobs" / name / "stages"
    records = [json.loads((base / str(s) / "selection.json").read_text()) for s in (0, 1)]
    for r in records:
        assert r.pop("seconds") >= 0
    return records


@pytest.mark.parametrize("selector", ["cropi", "influence_once", "random", "learnability", "pass_rate",
                                      "learnability_once", "pass_rate_once", "dynamic"])
def test_each_stage_trains_on_its_recorded_selection(selector, tiny_model, tmp_path, mixed_rewards):
    spec = parse_spec(job(selector))
    result = run_job(spec, tmp_path / "run", Console(quiet=True))
    sel = selections(tmp_path / "run", spec.name)
    k = 40 if selector == "dynamic" else 10  # dynamic sampling draws from the whole pool; else ceil(0.25 * 40)
    for s in sel:
        assert s["selector"] == selector
        assert 0 < s["selected"] <= k and len(s["prompt_ids"]) == s["selected"]
    assert [st["selected"] for st in result.stages] == [s["selected"] for s in sel]
    assert result.steps == 4
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in records if r["kind"] == "train"] == [0, 0, 1, 1]
    if selector.endswith("_once"):
        assert sel[0]["prompt_ids"] == sel[1]["prompt_ids"]
    if selector in ("cropi", "influence_once"):
        assert (tmp_path / "run" / "store" / "jobs" / spec.name / "stages" / "0" / "grads").is_dir()


def test_same_seed_same_cropi_selection(tiny_model, tmp_path, mixed_rewards):
    spec = parse_spec(job("cropi"))
    run_job(spec, tmp_path / "a", Console(quiet=True))
    run_job(spec, tmp_path / "b", Console(quiet=True))
    assert selections(tmp_path / "a", spec.name) == selections(tmp_path / "b", spec.name)


@pytest.mark.parametrize("heuristic", ["learnability", "pass_rate"])
def test_a_static_heuristic_keeps_its_first_draw_and_a_redrawn_one_draws_again(heuristic, tiny_model, tmp_path,
                                                                               mixed_rewards):
    redrawn = parse_spec(job(heuristic))
    static = parse_spec(job(f"{heuristic}_once"))
    run_job(redrawn, tmp_path / "redrawn", Console(quiet=True))
    run_job(static, tmp_path / "static", Console(quiet=True))
    r, s = selections(tmp_path / "redrawn", redrawn.name), selections(tmp_path / "static", static.name)
    # Both draw the same stage 0 (same seed); only the redrawn one draws stage 1 afresh.
    assert r[0]["prompt_ids"] == s[0]["prompt_ids"]
    assert s[1]["prompt_ids"] == s[0]["prompt_ids"] and s[1]["note"] == "stage 0's selection, kept"
    assert r[1]["prompt_ids"] != r[0]["prompt_ids"]


def test_dynamic_sampling_trains_on_mixed_groups_and_counts_its_extra_draws(tiny_model, tmp_path, mixed_rewards):
    spec = parse_spec(job("dynamic"))
    run_job(spec, tmp_path / "run", Console(quiet=True))
    train = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in train if r["kind"] == "train"]
    assert all(1 <= r["draws"] <= spec.curriculum.dynamic_max_draws for r in train)
    # With kept groups only, no trained group is flat (unless no batch had a mixed one).
    assert all(r["zero_var_groups"] == 0 or r["draws"] == spec.curriculum.dynamic_max_draws for r in train)
