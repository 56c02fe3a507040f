"""A user's own data and rewards: verl-format parquet as it is, dotted field paths, chat and
format templates, reward functions named in the spec and dispatched per row by data_source."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cropi.data.rewards import RewardError, reward
from cropi.data.sources import load_source
from cropi.data.templates import chat_prompts, check_context
from cropi.errors import InputError
from cropi.spec import parse_spec

from .conftest import run_cli

VERL_ROWS = [
    {"data_source": "openai/gsm8k",
     "prompt": [{"role": "user", "content": "Natalia sold 48 clips in April and half as many in May. Total?"}],
     "ability": "math", "reward_model": {"style": "rule", "ground_truth": "72"},
     "extra_info": {"split": "train", "index": 0}},
    {"data_source": "DigitalLearningGmbH/MATH-lighteval",
     "prompt": [{"role": "system", "content": "Reason step by step."},
                {"role": "user", "content": "What is $\\sqrt{16}$?"}],
     "ability": "math", "reward_model": {"style": "rule", "ground_truth": "4"},
     "extra_info": {"split": "train", "index": 1}},
]


def verl_parquet(tmp_path: Path, rows=VERL_ROWS) -> Path:
    path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def source(**fields):
    return parse_spec({"data": {"pool": fields}}).data.pool


def test_verl_parquet_reads_as_it_is_with_a_dotted_answer_path(tmp_path):
    prompts = load_source(source(source=str(verl_parquet(tmp_path)), answer_field="reward_model.ground_truth"),
                          "pool", seed=0)
    assert [p.answer for p in prompts] == ["72", "4"]
    assert [p.meta["data_source"] for p in prompts] == ["openai/gsm8k", "DigitalLearningGmbH/MATH-lighteval"]
    assert prompts[1].meta["chat"][0] == {"role": "system", "content": "Reason step by step."}
    assert prompts[0].meta["row"]["extra_info"] == {"split": "train", "index": 0}
    assert prompts[0].text.startswith("Natalia")  # without a chat template: the last user message


def test_a_dict_where_a_string_is_needed_is_an_error_naming_the_row_never_its_str(tmp_path):
    with pytest.raises(InputError, match=r"row 0: field 'reward_model' must be a string or number, got dict "
                                         r"\(name a field inside it with a dotted path"):
        load_source(source(source=str(verl_parquet(tmp_path)), answer_field="reward_model"), "pool", seed=0)


def test_a_missing_part_of_a_dotted_path_is_named(tmp_path):
    with pytest.raises(InputError, match=r"row 0: missing field 'reward_model.answer'"):
        load_source(source(source=str(verl_parquet(tmp_path)), answer_field="reward_model.answer"), "pool", seed=0)


def test_a_format_template_keeps_doubled_braces_literal_and_explains_single_ones(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "1+1?", "answer": "2"}) + "\n")
    ok = load_source(source(source=str(data), template="{prompt} Put the answer in \\boxed{{}}."), "pool", 0)
    assert ok[0].text == "1+1? Put the answer in \\boxed{}."
    with pytest.raises(InputError, match=r"data.pool.template: .* write literal braces doubled"):
        load_source(source(source=str(data), template="{prompt} \\boxed{}"), "pool", 0, field="data.pool")


def with_chat_template(tokenizer):
    tok = tokenizer.__class__.from_pretrained(tokenizer.name_or_path) if tokenizer.name_or_path else tokenizer
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    return tok


def test_a_chat_template_renders_the_rows_messages_and_a_system_prompt(tmp_path, tiny_model):
    tok = with_chat_template(tiny_model[1])
    prompts = load_source(source(source=str(verl_parquet(tmp_path)), answer_field="reward_model.ground_truth",
                                 template="chat", system_prompt="Be brief."), "pool", 0, tokenizer=tok)
    # Row 0 had no system message: the spec's is added; row 1 keeps its own.
    assert prompts[0].text == ("<system>Be brief.\n<user>Natalia sold 48 clips in April and half as many in May. "
                               "Total?\n<assistant>")
    assert prompts[1].text.startswith("<system>Reason step by step.\n<user>What is")


def test_chat_needs_a_tokenizer_with_a_chat_template(tiny_model):
    tok = tiny_model[1]
    assert not getattr(tok, "chat_template", None)
    with pytest.raises(InputError, match="has no chat template"):
        chat_prompts([], tok, None, "data.pool.template")


def test_a_prompt_beyond_the_models_context_is_an_error_naming_the_row(tmp_path, tiny_model):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "short", "answer": "1"}) + "\n"
                    + json.dumps({"prompt": "x" * 300, "answer": "1"}) + "\n")
    prompts = load_source(source(source=str(data)), "pool", 0)
    with pytest.raises(InputError, match=r"data set pool, line 2: the prompt is \d+ tokens; with "
                                         r"rollout.max_new_tokens 16 it exceeds the model's context of 256"):
        check_context(prompts, tiny_model[1], max_positions=256, max_new_tokens=16, set_name="pool")


REWARD_FILE = '''
def score(response, reference, row):
    # partial credit for mentioning the data source, full for the right answer
    return 1.0 if response.strip() == reference else (0.5 if row["data_source"] in response else 0.0)


def broken(response, reference, row):
    raise ZeroDivisionError("a bug")


def wordy(response, reference, row):
    return "yes"
'''


@pytest.fixture
def reward_file(tmp_path):
    path = tmp_path / "my_reward.py"
    path.write_text(REWARD_FILE)
    return path


def test_a_reward_function_in_a_file_gets_response_reference_and_row(tmp_path, reward_file):
    src = source(source=str(verl_parquet(tmp_path)), answer_field="reward_model.ground_truth",
                 verifier=f"{reward_file}:score")
    first = load_source(src, "pool", 0)[0]
    assert reward(first, "72") == 1.0
    assert reward(first, "see openai/gsm8k") == 0.5
    assert reward(first, "71") == 0.0


def test_rewards_dispatch_per_row_by_data_source(tmp_path, reward_file):
    src = source(source=str(verl_parquet(tmp_path)), answer_field="reward_model.ground_truth",
                 verifier_by_source={"openai/gsm8k": f"{reward_file}:score", "default": "math"})
    gsm, maths = load_source(src, "pool", 0)
    assert gsm.verifier.endswith(":score") and maths.verifier == "math"
    assert reward(maths, "The answer is $\\boxed{4}$.") == 1.0
    no_default = source(source=str(verl_parquet(tmp_path)), answer_field="reward_model.ground_truth",
                        verifier_by_source={"openai/gsm8k": "math"})
    with pytest.raises(InputError, match=r"verifier_by_source: row 1 has a data_source that is not a key"):
        load_source(no_default, "pool", 0, field="data.pool")


def test_a_reward_function_that_raises_or_returns_no_number_names_itself_and_the_row(tmp_path, reward_file):
    for name, message in (("broken", "raised ZeroDivisionError on data file .*train.parquet, row 0$"),
                          ("wordy", "returned a str, not a number, on data file .*train.parquet, row 0$")):
        src = source(source=str(verl_parquet(tmp_path)), answer_field="reward_model.ground_truth",
                     verifier=f"{reward_file}:{name}")
        first = load_source(src, "pool", 0)[0]
        with pytest.raises(RewardError, match=f"reward function .*my_reward.py:{name} {message}"):
            reward(first, "72")


@pytest.mark.parametrize("verifier, message", [
    ("nosuchmodule_xyz:score", "cannot import module 'nosuchmodule_xyz'"),
    ("json:loads", "must accept 3 positional arguments"),
    ("missing_file.py:score", "file missing_file.py not found"),
    ("exact", "must be one of auto, int, math, module:function or path/to/file.py:function"),
])
def test_a_bad_verifier_is_refused_when_the_spec_loads_naming_the_field(tmp_path, verifier, message):
    job = tmp_path / "job.yaml"
    job.write_text(json.dumps({"data": {"pool": {"source": "builtin:arith", "verifier": verifier}}}))
    result = run_cli("run", str(job), "--out", str(tmp_path / "run"))
    assert result.returncode == 2, result.stderr
    assert "data.pool.verifier" in result.stderr and message in result.stderr
    assert not (tmp_path / "run").exists()  # refused before anything was written


@pytest.mark.parametrize("preset", ["qwen2.5-1.5b-gsm8k-math.yaml", "qwen2.5-7b-ray.yaml"])
def test_the_real_model_presets_carry_the_papers_settings(preset):
    from cropi.spec import load_spec

    spec = load_spec(Path(__file__).resolve().parent.parent / "examples" / preset)
    assert spec.rl.lr == 1e-6 and spec.rl.batch_prompts == 128 and spec.rollout.n == 8
    assert spec.rl.kl_coef == 0.001 and spec.offline.temperature == 0.5 and spec.rollout.max_new_tokens == 2048
    assert spec.model.dtype == "bfloat16" and spec.rl.micro_batch_tokens
    assert spec.data.pool.answer_field == "reward_model.ground_truth"


def test_defaults_are_llm_sized_for_any_model_but_the_built_in_one():
    toy, llm = parse_spec({}), parse_spec({"model": {"path": "Qwen/Qwen2.5-1.5B-Instruct"}})
    assert (toy.rl.lr, toy.rollout.max_new_tokens, toy.rl.micro_batch) == (1e-3, 16, 256)
    assert (llm.rl.lr, llm.rollout.max_new_tokens, llm.rl.micro_batch) == (1e-6, 1024, 4)
    assert parse_spec({"model": {"path": "Qwen/Qwen2.5-1.5B-Instruct"}, "rl": {"lr": 3e-6}}).rl.lr == 3e-6


@pytest.mark.parametrize("patch, field, message", [
    ({"data": {"pool": {"source": "d.jsonl", "verifier_by_source": {"gsm8k": "exact"}}}},
     "data.pool.verifier_by_source", "['gsm8k']: must be one of auto, int, math"),
    ({"data": {"pool": {"source": "d.jsonl", "system_prompt": "Be brief."}}},
     "data.pool.system_prompt", "only applies with template: chat"),
    ({"data": {"pool": {"source": "d.jsonl", "answer_field": "reward_model..ground_truth"}}},
     "data.pool.answer_field", "must be a field name or a dotted path"),
    ({"rl": {"micro_batch_tokens": 0}}, "rl.micro_batch_tokens", "greater than 0"),
    ({"model": {"dtype": "int8"}}, "model.dtype", "'auto', 'float32', 'bfloat16' or 'float16'"),
    ({"device": "gpu"}, "device", "must be auto, cpu, cuda or cuda:N"),
])
def test_every_new_field_refuses_bad_input_naming_it_with_exit_2(tmp_path, patch, field, message):
    job = tmp_path / "job.yaml"
    job.write_text(json.dumps(patch))
    result = run_cli("run", str(job), "--out", str(tmp_path / "run"))
    assert result.returncode == 2, result.stderr
    assert field in result.stderr and message in result.stderr, result.stderr


def test_data_loads_where_the_models_files_are_absent_unless_a_chat_template_needs_them(tmp_path):
    # The controller reads the data without the model: only the context check needs its tokenizer,
    # and the workers (which load the model) run it. A chat template cannot do without it.
    from cropi.data.sources import load_job_data

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "1+1?", "answer": "2"}) + "\n")
    job = {"model": {"path": str(tmp_path / "not-here")}, "data": {"pool": {"source": str(data)}}}
    assert len(load_job_data(parse_spec(job)).pool) == 1
    job["data"]["pool"]["template"] = "chat"
    with pytest.raises(InputError, match="model.path: .* does not exist"):
        load_job_data(parse_spec(job))
