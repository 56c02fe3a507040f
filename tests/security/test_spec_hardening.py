"""Issue H part 8, spec hardening: one test per reproduced finding, each of which failed before.

A job spec is attacker-controlled input wherever the controller API or the operator takes it;
`cropi run` takes it from a file. Each refusal is an InputError (exit code 2, no traceback)
naming the source, the field path or the line, and never the offending value.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from cropi import embedded
from cropi.errors import InputError
from cropi.spec import JobSpec, load_spec, parse_spec, parse_spec_yaml
from cropi.spec_yaml import MAX_SPEC_BYTES

from ..conftest import run_cli

SECRET = "sk_SECRET_4f2a"  # not a DNS label, so `name:` refuses it too


def write(tmp_path: Path, text: str | bytes, name: str = "job.yaml") -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def refusal(text: str) -> str:
    with pytest.raises(InputError) as err:
        parse_spec_yaml(text, "job.yaml")
    return str(err.value)


def assert_clean_exit_2(result) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr + result.stdout


# --- the file itself -----------------------------------------------------------------------------


def test_a_binary_spec_file_is_refused_naming_the_file_and_offset(tmp_path):
    path = write(tmp_path, b"name: x\n\x00\x01\x02\xff\xfe junk")
    with pytest.raises(InputError) as err:
        load_spec(path)
    assert str(path) in str(err.value) and "binary" in str(err.value) and "offset 8" in str(err.value)


def test_a_binary_spec_file_exits_2_without_a_traceback(tmp_path):
    path = write(tmp_path, bytes(range(256)) * 4)
    result = run_cli("run", str(path), "--out", str(tmp_path / "out"))
    assert_clean_exit_2(result)
    assert str(path) in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_non_utf8_spec_file_is_refused_naming_the_byte_offset(tmp_path):
    path = write(tmp_path, "name: caf\u00e9\n".encode("latin-1"))  # \xe9 alone is not UTF-8
    with pytest.raises(InputError) as err:
        load_spec(path)
    msg = str(err.value)
    assert str(path) in msg and "not UTF-8" in msg and "offset 9" in msg
    assert "UnicodeDecodeError" not in msg


def test_control_characters_are_refused_by_position(tmp_path):
    msg = refusal("name: a\x07b\n")
    assert "unacceptable character #x0007 at position 7" in msg


def test_an_oversized_spec_file_is_refused_before_it_is_read(tmp_path):
    path = write(tmp_path, "# padding\n" * (MAX_SPEC_BYTES // 10 + 1))
    with pytest.raises(InputError, match=rf"at most {MAX_SPEC_BYTES} bytes"):
        load_spec(path)


def test_a_folder_as_spec_is_not_found(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_spec(tmp_path)


# --- values --------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, path", [
    ("rl:\n  lr: .inf\n", "rl.lr"),
    ("rl:\n  lr: .nan\n", "rl.lr"),
    ("rl:\n  lr: 1e400\n", "rl.lr"),  # overflows to inf
    ("rollout:\n  temperature: .inf\n", "rollout.temperature"),
    ("curriculum:\n  target_accuracy: .nan\n", "curriculum.target_accuracy"),
    ("influence:\n  logprob_temperature: .inf\n", "influence.logprob_temperature"),
    ("ray:\n  projector_gpus: .inf\n", "ray.projector_gpus"),
    ("rl:\n  kl_coef: .nan\n", "rl.kl_coef"),
])
def test_non_finite_floats_are_refused_everywhere(text, path):
    msg = refusal(text)
    assert f"{path}: Input should be a finite number (line 2)" in msg


def test_non_finite_floats_are_refused_from_dicts_too():
    with pytest.raises(InputError, match="rl.max_grad_norm: Input should be a finite number"):
        parse_spec({"rl": {"max_grad_norm": float("inf")}})


@pytest.mark.parametrize("text, path, kind", [
    ("curriculum:\n  stages: true\n", "curriculum.stages", "integer"),
    ("rl:\n  batch_prompts: 2.5\n", "rl.batch_prompts", "integer"),
    ("rl:\n  batch_prompts: 2.0\n", "rl.batch_prompts", "integer"),  # was taken as 2
    ("rl:\n  batch_prompts: '16'\n", "rl.batch_prompts", "integer"),  # was taken as 16
    ("name: x\nseed: false\n", "seed", "integer"),
    ("curriculum:\n  reset_optimizer: 1\n", "curriculum.reset_optimizer", "boolean"),
    ("curriculum:\n  reset_optimizer: 'yes'\n", "curriculum.reset_optimizer", "boolean"),
    ("rl:\n  lr: true\n", "rl.lr", "number"),
])
def test_booleans_integers_and_strings_are_not_interchangeable(text, path, kind):
    assert f"{path}: Input should be a valid {kind} (line 2)" in refusal(text)


def test_floats_still_parse_as_written_in_yaml():
    spec = parse_spec_yaml("rl: {lr: 3e-5, kl_coef: 1.0e-3, clip_eps: 1, max_grad_norm: 2.5e+1}\n"
                           "curriculum: {reset_optimizer: yes}\n")
    assert spec.rl.lr == 3e-5 and spec.rl.kl_coef == 1e-3 and spec.rl.max_grad_norm == 25.0
    assert spec.rl.clip_eps == 1.0 and isinstance(spec.rl.clip_eps, float)  # an int is a float
    assert spec.curriculum.reset_optimizer is True


# --- YAML structure ------------------------------------------------------------------------------


def test_duplicate_keys_are_refused_naming_the_key_and_its_lines():
    msg = refusal(f"name: a\nrl:\n  lr: 0.1\n  batch_prompts: 4\n  lr: {SECRET}\n")
    assert "rl.lr: duplicate key (line 5; first at line 3)" in msg
    assert "job.yaml" in msg


def test_duplicate_keys_are_found_inside_lists_and_flow_mappings():
    msg = refusal("data:\n  validation:\n    - {name: a, source: 'builtin:arith', name: b}\n")
    assert "data.validation.0.name: duplicate key (line 3; first at line 3)" in msg
    msg = refusal("seed: 1\nname: x\nseed: 1\n")  # even with the same value
    assert "seed: duplicate key (line 3; first at line 1)" in msg


def test_yaml_aliases_are_refused_naming_the_line():
    # The finding: nested aliases turned a 140 KB body into a 3.26 MB stored spec.
    laughs = ["a0: &a0 [x, x, x, x, x, x, x, x]"]
    for i in range(1, 9):
        laughs.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 8)}]")
    text = "\n".join(laughs) + "\ndata:\n  verifier_by_source: *a8\n"
    msg = refusal(text)
    assert "line 1: an anchor (&name)" in msg and "aliases" in msg
    msg = refusal("name: a\nrl:\n  lr: *nowhere\n")
    assert "line 3: an alias (*name)" in msg


def test_a_stored_spec_has_no_anchors_even_for_shared_values():
    spec = parse_spec({"influence": {"params": ["last:1"]}})
    text = spec.to_yaml()
    assert "&" not in text and "*" not in text
    assert parse_spec_yaml(text) == spec


# --- sizes ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("data, path", [
    ({"data": {"pool": {"source": "builtin:arith", "size": 1_500_000}}}, "data.pool.size"),  # the finding
    ({"data": {"validation": [{"name": "v", "source": "builtin:arith", "size": 100_001}]}}, "data.validation.0.size"),
    ({"data": {"untargeted": [{"name": "u", "source": "builtin:arith", "size": 100_001}]}}, "data.untargeted.0.size"),
    ({"data": {"validation": [{"name": f"v{i}", "source": "builtin:arith"} for i in range(101)]}}, "data.validation"),
    ({"rollout": {"n": 1025}}, "rollout.n"),
    ({"rollout": {"max_new_tokens": 2**20 + 1}}, "rollout.max_new_tokens"),
    ({"offline": {"n_pool": 1025}}, "offline.n_pool"),
    ({"offline": {"n_valid": 1025}}, "offline.n_valid"),
    ({"influence": {"proj_dim": 2**20 + 1}}, "influence.proj_dim"),
    ({"influence": {"candidates": 1_000_001}}, "influence.candidates"),
    ({"influence": {"max_valid_prompts": 100_001}}, "influence.max_valid_prompts"),
    ({"rl": {"batch_prompts": 2**16 + 1}}, "rl.batch_prompts"),
    ({"eval": {"samples": 1025}}, "eval.samples"),
    ({"curriculum": {"stages": 10_001}}, "curriculum.stages"),
    ({"ray": {"projector_actors": 1025}}, "ray.projector_actors"),
    ({"seed": 2**64}, "seed"),
])
def test_sizes_are_capped_naming_the_field(data, path):
    with pytest.raises(InputError) as err:
        parse_spec(data)
    assert f"  {path}: " in str(err.value)


def test_sizes_at_their_caps_are_accepted():
    spec = parse_spec({"data": {"pool": {"source": "builtin:arith", "size": 1_000_000}},
                       "rollout": {"n": 1024}, "influence": {"proj_dim": 2**20}})
    assert spec.data.pool.size == 1_000_000


def test_each_capped_field_documents_its_limit():
    schema = json.dumps(JobSpec.model_json_schema())
    for limit in ("at most 1000000", "at most 100000", "at most 1024", f"at most {2**20}"):
        assert limit in schema
    pool = JobSpec.model_json_schema()["$defs"]["DataSource"]["properties"]["size"]
    assert "at most 1000000" in pool["description"]


# --- messages ------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", [
    f"rl:\n  lr: 0.1\n  lr: {SECRET}\n",  # duplicate key
    f"rollout:\n  n: {SECRET}\n",  # wrong type
    f"curriculum:\n  selector: {SECRET}\n",  # not one of the choices
    f"name: {SECRET}\n",  # pattern
    f"rl: [unclosed, {SECRET}\n",  # YAML syntax: PyYAML quotes the line
    f"rl:\n\t lr: {SECRET}\n",  # a tab
    f"a: &{SECRET} 1\n",  # an anchor's name
])
def test_messages_never_echo_the_offending_value(text):
    msg = refusal(text)
    assert SECRET not in msg
    assert "line" in msg


# --- the run folder ------------------------------------------------------------------------------


def _fake_model(tmp_path: Path) -> Path:
    """A folder `model.path` accepts (it has a config.json) without building or loading a model."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    return model


def _job(tmp_path: Path, pool_source: str) -> dict:
    return {"name": "hardening", "model": {"path": str(_fake_model(tmp_path))},
            "data": {"pool": {"source": pool_source, "size": 8}},
            "curriculum": {"selector": "full", "stages": 1, "steps_per_stage": 1}}


def test_out_is_not_created_when_the_specs_data_file_is_missing(tmp_path):
    job = write(tmp_path, yaml.safe_dump(_job(tmp_path, str(tmp_path / "missing.jsonl"))))
    out = tmp_path / "runs" / "out"
    result = run_cli("run", str(job), "--out", str(out), "--restart")
    assert_clean_exit_2(result)
    assert "missing.jsonl" in result.stderr
    assert not out.exists() and not out.parent.exists()


def test_a_refused_run_leaves_an_existing_out_folder_as_it_was(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    job = write(tmp_path, yaml.safe_dump(_job(tmp_path, str(tmp_path / "missing.jsonl"))))
    result = run_cli("run", str(job), "--out", str(out))
    assert_clean_exit_2(result)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert (out / "notes.txt").read_text() == "mine"


class _Refusing:
    def __init__(self, *args, **kwargs):
        raise InputError("refused while starting")


def test_a_folder_created_by_a_run_refused_while_starting_is_removed(tmp_path, monkeypatch):
    monkeypatch.setattr(embedded, "RedisServer", _Refusing)  # fails after the folder is made
    spec = parse_spec(_job(tmp_path, "builtin:arith"))
    out = tmp_path / "new" / "out"
    with pytest.raises(InputError, match="refused while starting"):
        embedded.run_job(spec, out)
    assert not out.exists() and not out.parent.exists()


def test_a_folder_that_existed_is_kept_when_a_run_is_refused_while_starting(tmp_path, monkeypatch):
    monkeypatch.setattr(embedded, "RedisServer", _Refusing)
    spec = parse_spec(_job(tmp_path, "builtin:arith"))
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(InputError):
        embedded.run_job(spec, out)
    assert (out / "notes.txt").read_text() == "mine"
