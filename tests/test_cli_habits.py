"""Issue I part 5, the command line's habits: `cropi --version`, `cropi validate` (run's checks
without running, and a cost estimate checked against a hand computation), `--set a.b=c` on
run/submit/validate (typed by the spec, errors naming the field and never the value), and bool
options shown as plain flags in every command's --help."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import typer
import yaml
from typer.testing import CliRunner

import cropi
from cropi.curriculum.controller import cached_job_data
from cropi.errors import InputError
from cropi.estimate import estimate, llama_parameters, model_parameters
from cropi.spec import parse_spec
from cropi.spec_overrides import load_spec_with

from .cli_in_process import run_cropi
from .jobs import tiny_job

SECRET = "s3cr3t-value-xyz"
# Pool and validation of different skills: nothing is dropped as contaminated, so the counts are the sizes.
JOB = tiny_job(name="habits", device="cpu",
               data={"pool": {"source": "builtin:arith?skills=sub&digits=1-2", "size": 40},
                     "validation": [{"name": "add1", "source": "builtin:arith?skills=add&digits=1", "size": 8}]})


cropi_cli = run_cropi


@pytest.fixture
def job_file(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(JOB))
    return path


def test_version_is_the_package_version(monkeypatch, capsys):
    pyproject = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())
    assert cropi_cli(monkeypatch, capsys, "--version") == (0, f"cropi {cropi.__version__}")
    assert cropi.__version__ == pyproject["project"]["version"]


def test_the_estimate_of_a_tiny_job_by_hand():
    spec = parse_spec(JOB)
    e = estimate(spec, cached_job_data(spec), "cpu")
    assert (e.pool_prompts, e.validation_prompts, e.untargeted_prompts) == (40, 8, 0)
    assert e.offline_generations == 40 * 4 + 8 * 4  # pool x n_pool + validation x n_valid
    # cropi projects at both stages: every pool prompt and min(8, max_valid_prompts=4) targets.
    assert (e.projection_stages, e.scored_per_stage, e.targets_per_stage) == (2, 40, 4)
    assert e.backward_passes == 2 * (40 + 4)
    assert e.rollouts == 2 * 2 * 2 * 4  # stages x steps_per_stage x batch_prompts x rollout.n
    # The built-in model: hidden 128, 4 layers (q, k, v, o 128x128; MLP 3 x 128x512; 2 norms), vocab 88
    # (embedding and head untied), final norm.
    params = 4 * (4 * 128 * 128 + 3 * 128 * 512 + 2 * 128) + 2 * 88 * 128 + 128
    assert params == 1_072_256 and (e.parameters, e.bytes_per_param) == (params, 4)
    assert e.offline_bytes == 192 * 4 * 12  # generations x max_new_tokens x 12 B
    assert e.gradient_bytes == 2 * 44 * (128 * 2 + 4)  # per stage: prompts x (proj_dim x fp16 + a norm)
    assert e.checkpoint_bytes == 2 * params * 4 and e.trainer_state_bytes == params * (4 + 8)
    assert e.store_bytes == e.offline_bytes + e.gradient_bytes + e.checkpoint_bytes + e.trainer_state_bytes


def test_the_estimate_follows_the_selector_and_the_model():
    full = parse_spec(tiny_job(curriculum={"selector": "full", "stages": 3, "steps_per_stage": 5},
                               influence={"candidates": 10}))
    e = estimate(full, cached_job_data(full), "cuda")
    assert (e.offline_generations, e.backward_passes, e.gradient_bytes) == (0, 0, 0)  # no offline, no influence
    assert e.bytes_per_param == 2 and e.rollouts == 15 * 2 * 4  # auto dtype on CUDA: bfloat16
    once = parse_spec(tiny_job(curriculum={"selector": "influence_once", "stages": 3, "steps_per_stage": 1},
                               influence={"candidates": 10, "proj_dim": 64}))
    e = estimate(once, cached_job_data(once), "cpu")
    assert (e.projection_stages, e.scored_per_stage) == (1, 10)
    assert model_parameters("Qwen/Qwen2.5-0.5B") == (None, "unknown (a hub id: its config is not read here)")
    cfg = {"hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128, "vocab_size": 100,
           "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": True}
    assert llama_parameters(cfg) == 100 * 64 + 2 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128 + 2 * 64) + 64


def test_validate_a_good_job(monkeypatch, capsys, job_file, tmp_path):
    code, text = cropi_cli(monkeypatch, capsys, "validate", str(job_file), "--out", str(tmp_path / "run"))
    assert code == 0, text
    assert "habits: valid" in text and "offline generations: 192" in text and "= 32 rollouts" in text
    assert "gradient backward passes: 88" in text and "1,072,256" in text
    assert not (tmp_path / "run").exists()  # nothing run, nothing written


@pytest.mark.parametrize("change, named", [
    ({"curriculum": {"stagez": 3}}, "curriculum.stagez: unknown field"),
    ({"model": {"path": "builtin:tiny-nope"}}, "model.path: unknown built-in model"),
    ({"data": {"pool": {"source": "/no/such/file.jsonl"}}}, "data file /no/such/file.jsonl: not found"),
    ({"device": "cuda:7"}, "device: cuda:7"),
])
def test_validate_a_bad_job_names_the_field(monkeypatch, capsys, tmp_path, change, named):
    job = tiny_job(name="bad")
    for section, value in change.items():
        job[section] = {**job[section], **value} if isinstance(value, dict) and section in job else value
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    code, text = cropi_cli(monkeypatch, capsys, "validate", str(path))
    assert code == 2 and named in text and "Traceback" not in text, text


def test_validate_refuses_a_run_folder_of_another_job(monkeypatch, capsys, job_file, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "spec.yaml").write_text("name: other\n")
    code, text = cropi_cli(monkeypatch, capsys, "validate", str(job_file), "--out", str(tmp_path / "run"))
    assert code == 2 and "holds a run of a different spec" in text


def test_set_values_are_typed_by_the_spec(job_file):
    spec = load_spec_with(job_file, ["rl.lr=1e-5", "curriculum.stages=3", "data.validation.0.size=6",
                                     "influence.candidates=", "curriculum.selector=random", "name=other-name"])
    assert isinstance(spec.rl.lr, float) and spec.rl.lr == 1e-5
    assert spec.curriculum.stages == 3 and type(spec.curriculum.stages) is int
    assert spec.data.validation[0].size == 6 and spec.influence.candidates is None
    assert (spec.curriculum.selector, spec.name) == ("random", "other-name")
    assert load_spec_with(job_file, []) == parse_spec(JOB)  # no --set: the file as it is


@pytest.mark.parametrize("override, message", [
    ("curriculum.stagez=3", "--set curriculum.stagez: unknown field curriculum.stagez"),
    ("stagez=3", "--set stagez: unknown field stagez"),
    (f"rl.lr={SECRET}", "--set rl.lr: Input should be a valid number"),
    ("curriculum.stages=true", "--set curriculum.stages: Input should be a valid integer"),
    ("curriculum.stages=2.5", "--set curriculum.stages: Input should be a valid integer"),
    ("curriculum.stages=0", "--set curriculum.stages: Input should be greater than 0"),
    (f"data.validation.3.size={SECRET}", "--set data.validation.3.size: data.validation is a list of 1 entries"),
    (f"data.untargeted.0.size={SECRET}", "--set data.untargeted.0.size: data.untargeted has no entries"),
    (f"name.first={SECRET}", "--set name.first: name is not a section"),
    ("rl.lr", "--set rl.lr: expected PATH=VALUE"),
    (f"rl..lr={SECRET}", "expected PATH=VALUE"),
    (f"rl.lr=[{SECRET}", "--set rl.lr: the value is not valid YAML"),
    (f"rl.lr=&a {SECRET}", "--set rl.lr: the value is not valid YAML"),
    (f"curriculum={SECRET}", "--set curriculum: Input should be a valid dictionary"),
])
def test_set_errors_name_the_field_never_the_value(job_file, override, message):
    with pytest.raises(InputError) as err:
        load_spec_with(job_file, [override])
    assert message in str(err.value) and SECRET not in str(err.value), str(err.value)


@pytest.mark.parametrize("command", ["run", "submit", "validate"])
def test_set_is_applied_by_run_submit_and_validate(monkeypatch, capsys, job_file, tmp_path, command):
    monkeypatch.delenv("CROPI_CONTROLLER", raising=False)
    extra = ["--out", str(tmp_path / "run")] if command != "submit" else []
    code, text = cropi_cli(monkeypatch, capsys, command, str(job_file), *extra, "--set", "curriculum.stagez=3",
                           "--set", f"rl.lr={SECRET}")
    assert code == 2, text
    assert "--set curriculum.stagez: unknown field curriculum.stagez" in text and "--set rl.lr:" in text
    assert SECRET not in text and not (tmp_path / "run").exists()  # refused before a folder or a request


def _commands(group: typer.main.TyperGroup, path: tuple[str, ...] = ()):
    yield path, group
    for name, sub in getattr(group, "commands", {}).items():
        yield from _commands(sub, (*path, name))


def test_bool_options_are_plain_flags_in_every_help():
    from services.cli import app

    runner, seen = CliRunner(), []
    for path, command in _commands(typer.main.get_command(app)):
        help_text = runner.invoke(app, [*path, "--help"], terminal_width=200).output
        assert "<bool>" not in help_text, path
        for param in command.params:
            if getattr(param, "is_flag", False):
                opt = param.opts[0]
                line = next(line for line in help_text.splitlines() if opt + " " in line)
                # `--follow -f keep printing ...`, never `--follow -f <bool> ...` (or BOOLEAN)
                assert not re.search(re.escape(opt) + r"(\s+-\w)?\s+(<|BOOLEAN)", line), (path, line)
                seen.append((path, opt))
    for flag in [(("run",), "--restart"), (("submit",), "--wait"), (("logs",), "--follow"), ((), "--version"),
                 (("inspect",), "--json"), (("status",), "--json")]:
        assert flag in seen
