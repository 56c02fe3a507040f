"""The job spec: defaults, and errors that name the field path and line."""

import pytest

from cropi.errors import InputError
from cropi.spec import JobSpec, load_spec, parse_spec


def write(tmp_path, text):
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return path


def test_an_empty_spec_gets_the_design_defaults():
    spec = parse_spec({})
    assert spec.rollout.n == 8
    assert spec.offline.n_pool == 8 and spec.offline.n_valid == 32 and spec.offline.temperature == 0.5
    assert spec.rl.clip_eps == 0.2 and spec.rl.kl_coef == 0.001 and spec.rl.entropy_coef == 0.001
    assert spec.curriculum.selector == "cropi" and spec.curriculum.select_ratio == 0.1
    assert spec.influence.proj_dim == 8192 and spec.influence.sparse_ratio == 1.0  # measured, see docs
    assert spec.model.path == "builtin:tiny-arith"


def test_the_example_job_loads():
    spec = load_spec("examples/arith.yaml")
    assert spec.data.validation, "the demo must evaluate on targeted validation sets"
    assert spec.curriculum.selector == "cropi" and spec.curriculum.stages > 1, "the main job is a CROPI curriculum"


def test_spec_round_trips_through_yaml(tmp_path):
    spec = parse_spec({"name": "x", "rl": {"lr": 0.01}})
    again = load_spec(write(tmp_path, spec.to_yaml()))
    assert again == spec


def test_unknown_key_names_its_path_and_line(tmp_path):
    path = write(tmp_path, "name: a\nrl:\n  lr: 0.1\n  learning_rate: 0.2\n")
    with pytest.raises(InputError) as err:
        load_spec(path)
    msg = str(err.value)
    assert "rl.learning_rate: unknown field" in msg
    assert "line 4" in msg
    assert str(path) in msg


def test_wrong_type_names_its_path(tmp_path):
    with pytest.raises(InputError, match=r"rollout\.n: .*integer.*\(line 2\)"):
        load_spec(write(tmp_path, "rollout:\n  n: many\n"))


def test_errors_inside_lists_name_the_index(tmp_path):
    text = "data:\n  validation:\n    - {name: a, source: 'builtin:arith'}\n    - {name: b, sorce: x}\n"
    with pytest.raises(InputError) as err:
        load_spec(write(tmp_path, text))
    assert "data.validation.1.sorce: unknown field (line 4)" in str(err.value)
    assert "data.validation.1.source: Field required" in str(err.value)


@pytest.mark.parametrize(
    "data, fragment",
    [
        ({"name": "Bad_Name"}, "name: Value error, must be a DNS label"),
        ({"curriculum": {"selector": "best"}}, "curriculum.selector"),
        ({"curriculum": {"select_ratio": 1.5}}, "curriculum.select_ratio"),
        ({"rollout": {"temperature": 0}}, "rollout.temperature"),
        ({"rollout": {"n": 1}}, "rollout.n"),
        ({"seed": "zero"}, "seed"),
        ({"rollout": {"engine": "vllm"}}, "executor: Value error, rollout.engine vllm runs in the Ray rollout service"),
    ],
)
def test_invalid_values_are_rejected_with_their_path(data, fragment):
    with pytest.raises(InputError, match=fragment):
        parse_spec(data)


def test_missing_file_and_bad_yaml_are_input_errors(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_spec(tmp_path / "nope.yaml")
    with pytest.raises(InputError, match="not valid YAML"):
        load_spec(write(tmp_path, "rl: [unclosed\n"))
    with pytest.raises(InputError, match="must be a mapping"):
        load_spec(write(tmp_path, "- 1\n- 2\n"))


def test_total_steps_is_stages_times_steps_per_stage():
    assert JobSpec(curriculum={"stages": 3, "steps_per_stage": 7}).total_steps == 21
