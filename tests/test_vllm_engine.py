"""The vLLM rollout engine keeps the `Trajectory` contract of the HF engine
(log-probs of the tempered distribution, EOS kept, seeded and reproducible)
and takes new weights while it runs.

Only the first test runs without vLLM; the others need the `gpu` extra and a
CUDA device (vLLM does not run on this project's CPU machines).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from cropi.errors import InputError
from cropi.rl.batch import collate, response_logits, token_logprobs
from cropi.rollout.base import SamplingParams, Trajectory
from cropi.rollout.hf import HFRolloutEngine

from .conftest import TEST_MODEL
from .weights import perturbed

PROMPTS = ["1+2=", "max(12,3456)=", "rev(98)="]
HAS_VLLM = importlib.util.find_spec("vllm") is not None
# Marks rather than a skip inside the fixture: pytest sets up the session's tiny model before module fixtures.
_WHY_NOT = ("vLLM is an optional extra (cropi[gpu], CUDA machines only): not installed" if not HAS_VLLM
            else None if torch.cuda.is_available() else "vLLM needs a CUDA device")
needs_vllm = pytest.mark.skipif(_WHY_NOT is not None, reason=_WHY_NOT or "")


def test_without_vllm_the_engine_refuses_naming_the_gpu_extra():
    if HAS_VLLM:
        pytest.skip("vLLM is installed here: the refusal cannot happen")
    from cropi.executors.ray.replica import RolloutConfig, build_replica
    from cropi.rollout.vllm import VLLMRolloutEngine

    with pytest.raises(InputError, match=r"pip install 'cropi\[gpu\]'"):
        VLLMRolloutEngine(TEST_MODEL)
    with pytest.raises(InputError, match=r"`gpu` extra"):  # a replica configured for vLLM says the same
        build_replica(RolloutConfig(model_path=TEST_MODEL, engine="vllm"))


@pytest.fixture(scope="module")
def vllm_engine():
    from cropi.rollout.vllm import VLLMRolloutEngine

    return VLLMRolloutEngine(TEST_MODEL, dtype="float32", gpu_memory_utilization=0.2, enforce_eager=True)


def _teacher_forced(model, trajectories, temperature):
    batch = collate(trajectories, 0).to(next(model.parameters()).device)
    with torch.no_grad():
        logp = token_logprobs(response_logits(model, batch, temperature), batch.response_ids)
    return [logp[i, : len(t.response_ids)].tolist() for i, t in enumerate(trajectories)]


@needs_vllm
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_logprobs_are_those_of_the_tempered_distribution_the_trainer_recomputes(vllm_engine, tiny_model,
                                                                                 temperature):
    model, tok = tiny_model
    groups = vllm_engine.generate(PROMPTS, 4, SamplingParams(temperature=temperature, max_new_tokens=8, seed=3))
    flat = [t for g in groups for t in g]
    for t, recomputed in zip(flat, _teacher_forced(model, flat, temperature)):
        assert t.logprobs == pytest.approx(recomputed, abs=2e-4)
    for prompt, group in zip(PROMPTS, groups):
        for t in group:
            assert t.prompt_ids == tok(prompt)["input_ids"] and t.temperature == temperature
            assert t.finished == (t.response_ids[-1:] == [tok.eos_token_id])
            body = t.response_ids[:-1] if t.finished else t.response_ids
            assert t.text == tok.decode(body, skip_special_tokens=True)


@needs_vllm
def test_greedy_decoding_follows_the_argmax_and_reports_temperature_one(vllm_engine, tiny_model):
    model, tok = tiny_model
    greedy = SamplingParams(greedy=True, max_new_tokens=6)
    got = vllm_engine.generate(PROMPTS, 1, greedy)
    want = HFRolloutEngine(model, tok).generate(PROMPTS, 1, greedy)
    assert [g[0].response_ids for g in got] == [w[0].response_ids for w in want]
    assert all(g[0].temperature == 1.0 for g in got)


@needs_vllm
def test_a_seed_reproduces_a_request_whatever_runs_beside_it(vllm_engine):
    a = SamplingParams(temperature=1.0, max_new_tokens=8, seed=1)
    b = SamplingParams(temperature=1.0, max_new_tokens=8, seed=2)
    ids = lambda groups: [[t.response_ids for t in g] for g in groups]
    alone = vllm_engine.generate(PROMPTS, 4, a)
    together = vllm_engine.generate_many([(PROMPTS[:1], 3, b), (PROMPTS, 4, a)])
    assert ids(together[1]) == ids(alone)
    assert ids(vllm_engine.generate(PROMPTS, 4, b)) != ids(alone)


@needs_vllm
def test_new_weights_reach_the_running_engine(vllm_engine, tiny_model, tmp_path):
    model, tok = tiny_model
    new = perturbed(model, seed=5)
    prompt_ids, response_ids = tok("max(3,9)=")["input_ids"], tok("9")["input_ids"] + [tok.eos_token_id]

    assert vllm_engine.load_weights(new.named_parameters()) == len(list(new.named_parameters()))
    fixed = [Trajectory(prompt_ids, response_ids, [0.0] * len(response_ids), "", False)]
    assert vllm_engine.score(prompt_ids, response_ids) == pytest.approx(_teacher_forced(new, fixed, 1.0)[0],
                                                                        abs=2e-4)

    model.save_pretrained(tmp_path)  # back to the original weights, from a checkpoint folder
    vllm_engine.load_weights_from_path(tmp_path)
    assert vllm_engine.score(prompt_ids, response_ids) == pytest.approx(_teacher_forced(model, fixed, 1.0)[0],
                                                                        abs=2e-4)
