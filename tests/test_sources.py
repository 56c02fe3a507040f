"""Resolving a job's data: roles, sizes, templates, decontamination."""

import json

import pytest

from cropi.data.sources import load_job_data, load_source
from cropi.errors import InputError
from cropi.spec import DataSource, parse_spec


def test_pool_gets_label_noise_and_validation_sets_do_not():
    pool = load_source(DataSource(source="builtin:arith", size=2000), "pool", seed=0)
    valid = load_source(DataSource(source="builtin:arith", size=2000), "valid-x", seed=0)
    assert any(p.meta["noisy"] for p in pool)
    assert not any(p.meta["noisy"] for p in valid)
    assert [p.text for p in pool[:50]] != [p.text for p in valid[:50]]


def test_builtin_sources_use_the_integer_verifier_and_files_math_verify(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"question": "1+1?", "solution": "#### 2"}) + "\n")
    from_file = load_source(DataSource(source=str(f), prompt_field="question", answer_field="solution"), "pool", 0)
    assert from_file[0].verifier == "math"
    assert load_source(DataSource(source="builtin:arith", size=3), "pool", 0)[0].verifier == "int"


def test_size_takes_a_seeded_subset_of_a_file(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps({"prompt": f"q{i}", "answer": str(i)}) + "\n" for i in range(50)))
    src = DataSource(source=str(f), size=10)
    a, b = load_source(src, "pool", 0), load_source(src, "pool", 0)
    assert a == b and len(a) == 10
    assert [p.id for p in a] == sorted(p.id for p in a)
    assert a != load_source(src, "pool", 1)


def test_template_formats_prompts_and_bad_templates_are_input_errors():
    src = DataSource(source="builtin:arith", size=2, template="Q: {prompt}")
    assert all(p.text.startswith("Q: ") for p in load_source(src, "pool", 0))
    with pytest.raises(InputError, match="template"):
        load_source(DataSource(source="builtin:arith", size=2, template="{question}"), "pool", 0)


def test_unknown_builtin_is_an_input_error():
    with pytest.raises(InputError, match="unknown built-in data source"):
        load_source(DataSource(source="builtin:gsm8k"), "pool", 0)


def test_evaluation_prompts_are_removed_from_the_pool():
    spec = parse_spec({"data": {
        "pool": {"source": "builtin:arith?digits=1", "size": 500},
        "validation": [{"name": "add1", "source": "builtin:arith?skills=add&digits=1", "size": 50}],
    }})
    data = load_job_data(spec)
    held_out = {p.text for p in data.validation["add1"]}
    assert data.decontaminated > 0
    assert not held_out & {p.text for p in data.pool}


def test_duplicate_evaluation_names_are_rejected():
    spec = parse_spec({"data": {
        "validation": [{"name": "a", "source": "builtin:arith", "size": 5}],
        "untargeted": [{"name": "a", "source": "builtin:arith", "size": 5}],
    }})
    with pytest.raises(InputError, match="unique"):
        load_job_data(spec)
