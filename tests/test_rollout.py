"""The HF rollout engine returns the log-probs of the policy that sampled."""

import pytest
import torch

from cropi.rl.batch import collate, response_logits, token_logprobs
from cropi.rollout.base import SamplingParams
from cropi.rollout.hf import HFRolloutEngine

PROMPTS = ["1+2=", "123*4=", "max(12,3456)=", "rev(98)=", "sort(4031)="]


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_logprobs_equal_a_teacher_forced_recomputation(tiny_model, temperature):
    model, tok = tiny_model
    engine = HFRolloutEngine(model, tok, batch_size=16)  # several batches, ragged prompt lengths
    groups = engine.generate(PROMPTS, 4, SamplingParams(temperature=temperature, max_new_tokens=10, seed=3))
    flat = [t for g in groups for t in g]
    batch = collate(flat, tok.pad_token_id)
    with torch.no_grad():
        recomputed = token_logprobs(response_logits(model, batch, temperature), batch.response_ids)
    diff = ((recomputed - batch.old_logprobs).abs() * batch.response_mask).max().item()
    assert diff < 1e-5
    assert batch.response_mask.sum() > len(flat)  # responses are not all empty


def test_groups_follow_prompt_order_and_size(tiny_model):
    model, tok = tiny_model
    groups = HFRolloutEngine(model, tok).generate(PROMPTS, 3, SamplingParams(max_new_tokens=6))
    assert len(groups) == len(PROMPTS) and all(len(g) == 3 for g in groups)
    for prompt, group in zip(PROMPTS, groups):
        assert all(t.prompt_ids == tok(prompt)["input_ids"] for t in group)
        for t in group:
            assert len(t.logprobs) == len(t.response_ids) <= 6
            assert t.finished == (t.response_ids[-1:] == [tok.eos_token_id])
            assert all(lp <= 0 for lp in t.logprobs)


def test_same_seed_same_samples_other_seed_other_samples(tiny_model):
    model, tok = tiny_model
    engine = HFRolloutEngine(model, tok)
    a = engine.generate(PROMPTS, 8, SamplingParams(seed=1, max_new_tokens=8))
    b = engine.generate(PROMPTS, 8, SamplingParams(seed=1, max_new_tokens=8))
    c = engine.generate(PROMPTS, 8, SamplingParams(seed=2, max_new_tokens=8))
    texts = lambda gs: [[t.response_ids for t in g] for g in gs]  # noqa: E731
    assert texts(a) == texts(b)
    assert texts(a) != texts(c)


def test_greedy_decoding_matches_argmax_of_the_model(tiny_model):
    model, tok = tiny_model
    engine = HFRolloutEngine(model, tok)
    (traj,), = engine.generate(["12+34="], 1, SamplingParams(greedy=True, max_new_tokens=5))
    ids = torch.tensor([tok("12+34=")["input_ids"]])
    for expected in traj.response_ids:
        with torch.no_grad():
            nxt = model(input_ids=ids).logits[0, -1].argmax().item()
        assert nxt == expected
        ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)


def test_top_p_restricts_sampling_to_the_nucleus(tiny_model):
    model, tok = tiny_model
    engine = HFRolloutEngine(model, tok)
    tiny_p = engine.generate(["5+5="], 16, SamplingParams(top_p=1e-6, max_new_tokens=4, seed=0))[0]
    greedy = engine.generate(["5+5="], 1, SamplingParams(greedy=True, max_new_tokens=4))[0][0]
    assert all(t.response_ids == greedy.response_ids for t in tiny_p)
