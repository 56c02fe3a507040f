"""Devices and dtypes (docs/design.md §10), and the guard rails of a run: a device the machine
lacks, a pool with nothing to select, a folder whose run never trained. CUDA is absent on the
machines that run this suite; the GPU side runs in scripts/gpu_check.sh where one is lent."""

from __future__ import annotations

import json

import pytest
import torch
from rich.console import Console

from cropi.data.rewards import register_verifier
from cropi.devices import resolve_device, resolve_dtype
from cropi.embedded import clear_progress, prepare_run_dir, run_job
from cropi.errors import InputError
from cropi.spec import parse_spec

from .conftest import run_cli, stand_in_verifier
from .jobs import tiny_job

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks what happens without CUDA")


@no_cuda
def test_auto_is_the_cpu_in_float32_without_cuda():
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_dtype("auto", torch.device("cpu")) == "float32"
    assert resolve_dtype("auto", torch.device("cuda")) == "bfloat16"
    assert resolve_dtype("float16", torch.device("cpu")) == "float16"  # asked for explicitly: as asked


@no_cuda
def test_the_inline_policy_is_placed_on_the_resolved_device(tiny_model):
    from cropi.executors.inline import Policy

    policy = Policy(parse_spec(tiny_job()))
    assert policy.device == torch.device("cpu") and policy.dtype == "float32"
    assert {p.device.type for p in policy.model.parameters()} == {"cpu"}
    assert next(policy.model.parameters()).dtype == torch.float32


@no_cuda
@pytest.mark.parametrize("device, message", [("cuda", "has no CUDA device"), ("cuda:1", "has no CUDA device")])
def test_a_device_the_machine_lacks_is_refused_before_the_run_folder_is_touched(tmp_path, device, message):
    job = tmp_path / "job.yaml"
    job.write_text(json.dumps({**tiny_job(), "device": device}))
    result = run_cli("run", str(job), "--out", str(tmp_path / "run"))
    assert result.returncode == 2 and "device: " + device in result.stderr and message in result.stderr
    assert not (tmp_path / "run").exists()


def test_a_device_name_that_is_none_is_refused_naming_the_field():
    with pytest.raises(InputError, match=r"device: Value error, must be auto, cpu, cuda or cuda:N"):
        parse_spec({"device": "gpu"})


def test_a_pool_with_no_eligible_prompt_is_an_error_that_says_what_to_change(tmp_path, tiny_model):
    with register_verifier("int", lambda response, reference: 0.0), \
            pytest.raises(InputError, match=r"no pool prompt is eligible: all \d+ got equal rewards .* Raise "
                                            r"offline.temperature or offline.n_pool"):
        run_job(parse_spec(tiny_job(name="nothing-eligible")), tmp_path / "run", Console(quiet=True))


def test_too_few_eligible_prompts_is_a_warning_naming_the_counts(tmp_path, tiny_model):
    # Mixed rewards only for prompts whose answer ends in 7: far fewer than a stage keeps at ratio 0.9.
    def rare(response, reference):
        return stand_in_verifier(response, reference) if reference.endswith("7") else 0.0

    console = Console(record=True, width=200)
    job = tiny_job(name="few-eligible", curriculum={"selector": "cropi", "stages": 1, "steps_per_stage": 1,
                                                    "select_ratio": 0.9})
    with register_verifier("int", rare):
        run_job(parse_spec(job), tmp_path / "run", console)
    shown = console.export_text()
    assert "warning: only 6 of 40 pool prompts are eligible" in shown and "each stage wants 36" in shown


def test_restart_recovers_a_folder_whose_run_never_trained_but_keeps_one_that_did(tmp_path, tiny_model):
    run_dir = tmp_path / "run"
    first = parse_spec(tiny_job(name="restart-me"))
    with register_verifier("int", lambda response, reference: 0.0), pytest.raises(InputError):
        run_job(first, run_dir, Console(quiet=True))  # fails after its offline phase, before any step
    fixed = parse_spec(tiny_job(name="restart-me", offline={"n_pool": 6, "n_valid": 4}))
    with pytest.raises(InputError, match="holds a run of a different spec"):
        prepare_run_dir(fixed, run_dir)  # without --restart the folder is still protected
    clear_progress(fixed, run_dir)
    assert (run_dir / "spec.yaml").read_text() == fixed.to_yaml() and not (run_dir / "store").exists()

    # A folder with trained steps of another spec is refused even with --restart.
    (run_dir / "store/jobs/restart-me/trainer").mkdir(parents=True)
    (run_dir / "store/jobs/restart-me/trainer/state.pt").write_bytes(b"steps")
    with pytest.raises(InputError, match="holds a run of a different spec"):
        clear_progress(first, run_dir)
