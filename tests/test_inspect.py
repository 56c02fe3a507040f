"""`cropi inspect RUN_DIR`: what each stage selected, read back from the run folder."""

import json

import pytest
from rich.console import Console

from cropi.data.rewards import register_verifier
from cropi.embedded import run_job
from cropi.spec import parse_spec

from .conftest import run_cli, stand_in_verifier
from .jobs import tiny_job


@pytest.fixture(scope="module")
def cropi_run(tmp_path_factory, tiny_model):
    spec = parse_spec(tiny_job(
        name="inspect-me",
        data={"pool": {"source": "builtin:arith?skills=add,rev&digits=1-2", "size": 40},
              "validation": [{"name": "rev2", "source": "builtin:arith?skills=rev&digits=2", "size": 8}]},
        curriculum={"selector": "cropi", "stages": 2, "steps_per_stage": 1, "select_ratio": 0.25},
    ))
    run_dir = tmp_path_factory.mktemp("inspect") / "run"
    with register_verifier("int", stand_in_verifier):
        run_job(spec, run_dir, Console(quiet=True))
    return run_dir, spec


def stored_selection(run_dir, spec, stage):
    return json.loads((run_dir / f"store/jobs/{spec.name}/stages/{stage}/selection.json").read_text())


def test_json_lists_every_stage_with_prompts_histograms_and_overlap(cropi_run):
    run_dir, spec = cropi_run
    result = run_cli("inspect", str(run_dir), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["job"] == "inspect-me" and [s["stage"] for s in report["stages"]] == [0, 1]
    for st in report["stages"]:
        stored = stored_selection(run_dir, spec, st["stage"])
        assert [p["id"] for p in st["prompts"]] == stored["prompt_ids"]
        assert [p["score"] for p in st["prompts"]] == pytest.approx(stored["scores"])
        assert all(p["meta"][:3] in ("add", "rev") and 0 <= p["pass_rate"] <= 1 for p in st["prompts"])
        # Histograms: selected counts add up to the selection; no value is selected more than it is eligible.
        skills = st["histograms"]["skill"]
        assert sum(c["selected"] for c in skills.values()) == st["selected"]
        assert all(c["selected"] <= c["eligible"] for c in skills.values())
        assert set(st["histograms"]) == {"skill", "digits"}
    first, second = (set(stored_selection(run_dir, spec, s)["prompt_ids"]) for s in (0, 1))
    overlap = report["stages"][1]["overlap_with_previous"]
    assert overlap["shared"] == len(first & second) and overlap["jaccard"] == pytest.approx(
        len(first & second) / len(first | second))
    assert "overlap_with_previous" not in report["stages"][0]


def test_text_output_shows_one_stage_with_its_prompts(cropi_run):
    run_dir, spec = cropi_run
    result = run_cli("inspect", str(run_dir), "--stage", "1", "--top", "3")
    assert result.returncode == 0, result.stderr
    assert "stage 1:" in result.stdout and "stage 0:" not in result.stdout
    assert "skill: selected vs eligible" in result.stdout
    first = stored_selection(run_dir, spec, 1)["prompt_ids"][0]
    assert first in result.stdout


def test_a_missing_folder_a_stage_out_of_range_and_a_run_without_selections_exit_2(cropi_run, tmp_path):
    run_dir, spec = cropi_run
    missing = run_cli("inspect", str(tmp_path / "nope"))
    assert missing.returncode == 2 and "run folder not found" in missing.stderr
    out_of_range = run_cli("inspect", str(run_dir), "--stage", "5")
    assert out_of_range.returncode == 2 and "--stage 5" in out_of_range.stderr and "0, 1" in out_of_range.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "spec.yaml").write_text((run_dir / "spec.yaml").read_text())
    none = run_cli("inspect", str(empty))
    assert none.returncode == 2 and "no stored selections" in none.stderr
    not_a_run = tmp_path / "plain"
    not_a_run.mkdir()
    plain = run_cli("inspect", str(not_a_run))
    assert plain.returncode == 2 and "no spec.yaml" in plain.stderr
    for r in (missing, out_of_range, none, plain):
        assert "Traceback" not in r.stderr


def test_the_command_exits_cleanly_every_time(cropi_run):
    # pyarrow's thread pool used to abort this short process at exit (SIGABRT after complete output)
    # in about one run of two; five clean runs in a row would have happened by chance 1 time in 20.
    run_dir, _ = cropi_run
    for _ in range(5):
        result = run_cli("inspect", str(run_dir), "--json")
        assert result.returncode == 0, result.stderr


def test_the_report_shows_decoded_offline_and_training_samples(cropi_run):
    run_dir, spec = cropi_run
    report = json.loads(run_cli("inspect", str(run_dir), "--json").stdout)
    first = report["stages"][0]
    assert first["offline_samples"] and all(isinstance(r["text"], str) and 0 <= r["reward"] <= 1
                                            for s in first["offline_samples"] for r in s["responses"])
    assert [s["step"] for s in first["training_samples"]] == [1, 1]  # the stage's one step, two samples
    text = run_cli("inspect", str(run_dir), "--stage", "0").stdout
    assert "what the model said" in text
