"""POPI gradients (docs/design.md §2.2) and their streamed projection."""

import copy
import dataclasses
from functools import partial

import pytest
import torch

from cropi.curriculum.layout import offline_part_key, offline_prefix
from cropi.data import arith
from cropi.influence.offline import OfflineGroup, collect_offline, load_offline
from cropi.influence.popi import (
    POPIProjector,
    full_flat_gradient,
    group_batch,
    popi_loss,
)
from cropi.influence.projection import SparseProjector
from cropi.rl.batch import response_logits, token_logprobs
from cropi.rl.grpo import clipped_surrogate, group_advantages
from cropi.rollout.hf import HFRolloutEngine
from cropi.runtime.store import LocalStore

TEMPERATURE = 0.5


@pytest.fixture(scope="module")
def offline_groups(tiny_model, tmp_path_factory):
    model, tok = tiny_model
    store = LocalStore(tmp_path_factory.mktemp("store"))
    prompts = arith.generate(24, seed="popi", skills=("add", "mul"), digits=(1, 2))
    collect_offline(HFRolloutEngine(model, tok), store, partial(offline_part_key, "job", "pool"), "pool", prompts,
                    n=8, temperature=TEMPERATURE, max_new_tokens=6, seed=0, part_size=10)
    return load_offline(store, offline_prefix("job", "pool"))


def mixed(groups):
    """Groups with mixed rewards. The barely trained test model solves little,
    so rewards are assigned: the gradient math does not care where they came from."""
    pattern = [1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0]
    return [dataclasses.replace(g, rewards=pattern[: len(g.rewards)]) for g in groups]


def test_streamed_projection_equals_projection_of_the_full_autograd_gradient(tiny_model, offline_groups):
    model, tok = tiny_model
    projector = SparseProjector(dim=512, sparse_ratio=0.3, seed=7)
    popi = POPIProjector(model, projector, tok.pad_token_id)
    try:
        for group in mixed(offline_groups)[:3]:
            streamed = popi.project_group(group)
            flat = full_flat_gradient(model, lambda: popi_loss(model, group, tok.pad_token_id))
            reference = projector.project_flat(reversed(flat))  # another order of parameters
            assert torch.allclose(streamed, reference, rtol=1e-5, atol=1e-7)
            assert torch.equal(streamed, reference)  # same per-parameter sums: bit-identical
            assert all(p.grad is None for p in model.parameters())  # the hook freed every gradient
    finally:
        popi.close()


def test_at_the_behaviour_policy_popi_is_the_on_policy_grpo_gradient(tiny_model, offline_groups):
    model, tok = tiny_model
    group = mixed(offline_groups)[0]
    params = [p for p in model.parameters()]
    g_popi = torch.autograd.grad(popi_loss(model, group, tok.pad_token_id), params)

    batch = group_batch(group, tok.pad_token_id)
    logp = token_logprobs(response_logits(model, batch, TEMPERATURE), batch.response_ids)
    # rho = 1 at theta = beta: the recorded behaviour log-probs equal the recomputed ones.
    assert ((logp - batch.old_logprobs).abs() * batch.response_mask).max() < 1e-5
    adv = group_advantages(torch.tensor([group.rewards]))[0]
    pg, clip_frac = clipped_surrogate(logp, logp.detach(), adv, batch.response_mask, clip_eps=0.2,
                                      loss_agg="seq-mean-token-mean")
    assert clip_frac.item() == 0.0
    g_grpo = torch.autograd.grad(pg, params)
    # rho is 1 up to float rounding (~1e-6: sampled vs recomputed log-probs), so the two gradients agree to
    # ~1e-6 of each tensor's scale; element-wise relative checks fail where terms cancel to near zero.
    for a, b in zip(g_popi, g_grpo):
        assert (a - b).abs().max() <= 1e-5 * b.abs().max()


def moved_copy(model):
    """The model with every weight perturbed: a policy away from the behaviour policy."""
    moved = copy.deepcopy(model)
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return moved


def loss_by_hand(rho, batch, group):
    """-(1/G) sum_i A_i * mean_t rho_i,t."""
    mask = batch.response_mask
    return -(((rho * mask).sum(-1) / mask.sum(-1)) * group_advantages(torch.tensor([group.rewards]))[0]).mean()


def test_ratio_is_not_clipped_away_from_the_behaviour_policy(tiny_model, offline_groups):
    model, tok = tiny_model
    group = mixed(offline_groups)[0]
    moved = moved_copy(model)
    batch = group_batch(group, tok.pad_token_id)
    logp = token_logprobs(response_logits(moved, batch, TEMPERATURE), batch.response_ids)
    rho = torch.exp(logp - batch.old_logprobs)
    expected = loss_by_hand(rho, batch, group)
    assert (rho * batch.response_mask).max() > 1.2 or (rho + (1 - batch.response_mask)).min() < 0.8
    assert popi_loss(moved, group, tok.pad_token_id).item() == pytest.approx(expected.item(), rel=1e-5)


def test_prompts_with_equal_rewards_are_ineligible_and_get_no_vector(tiny_model):
    model, tok = tiny_model
    group = OfflineGroup("x", tok("1+1=")["input_ids"], [[5, 2], [6, 2]], [[-0.1, -0.2], [-0.3, -0.1]],
                         [1.0, 1.0], TEMPERATURE)
    popi = POPIProjector(model, SparseProjector(dim=64, sparse_ratio=1.0, seed=0), tok.pad_token_id)
    try:
        out = popi.project_groups([group])
    finally:
        popi.close()
    assert not out.eligible[0] and out.norms[0] == 0.0


def test_offline_parts_are_resumable_and_deterministic(tiny_model, tmp_path):
    model, tok = tiny_model
    engine = HFRolloutEngine(model, tok)
    prompts = arith.generate(12, seed="resume")
    a, b = LocalStore(tmp_path / "a"), LocalStore(tmp_path / "b")
    kwargs = dict(n=4, temperature=TEMPERATURE, max_new_tokens=5, seed=3, part_size=5)
    keys = partial(offline_part_key, "j", "pool")
    assert collect_offline(engine, a, keys, "pool", prompts, **kwargs) == 3
    assert collect_offline(engine, a, keys, "pool", prompts, **kwargs) == 0  # nothing redone
    # Another store that lost part 1 redoes only that part, with identical bytes.
    collect_offline(engine, b, keys, "pool", prompts, **kwargs)
    key = "jobs/j/offline/pool/part-00001.parquet"
    (tmp_path / "b" / key).unlink()
    assert collect_offline(engine, b, keys, "pool", prompts, **kwargs) == 1
    assert a.get(key) == b.get(key)
    groups = load_offline(a, offline_prefix("j", "pool"))
    assert [g.prompt_id for g in groups] == [p.id for p in prompts]
    assert all(len(g.response_ids) == 4 and len(g.rewards) == 4 for g in groups)


def test_at_temperature_one_both_policies_are_rescored_at_t1(tiny_model, offline_groups):
    # influence.logprob_temperature: 1.0 (the reference code): rho = pi_theta / pi_beta, both at T = 1,
    # with pi_beta the base model, not the stored (tempered) behaviour log-probs.
    model, tok = tiny_model
    group = mixed(offline_groups)[0]
    moved = moved_copy(model)
    batch = group_batch(group, tok.pad_token_id)
    rho = torch.exp(token_logprobs(response_logits(moved, batch, 1.0), batch.response_ids)
                    - token_logprobs(response_logits(model, batch, 1.0), batch.response_ids))
    expected = loss_by_hand(rho, batch, group)
    got = popi_loss(moved, group, tok.pad_token_id, temperature=1.0, behaviour=model)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    assert got.item() != pytest.approx(popi_loss(moved, group, tok.pad_token_id).item(), rel=1e-3)


def test_at_temperature_one_and_the_base_policy_rho_is_one_and_the_gradient_is_on_policy_at_t1(
        tiny_model, offline_groups):
    model, tok = tiny_model
    group = mixed(offline_groups)[0]
    params = list(model.parameters())
    g_t1 = torch.autograd.grad(popi_loss(model, group, tok.pad_token_id, temperature=1.0), params)
    batch = group_batch(group, tok.pad_token_id)
    logp = token_logprobs(response_logits(model, batch, 1.0), batch.response_ids)
    on_policy = loss_by_hand(logp, batch, group)  # d(rho)/d(theta) = d(log pi)/d(theta) at rho = 1
    g_ref = torch.autograd.grad(on_policy, params)
    for a, b in zip(g_t1, g_ref):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)
    g_sampling = torch.autograd.grad(popi_loss(model, group, tok.pad_token_id), params)
    assert not all(torch.allclose(a, b, rtol=1e-3, atol=1e-6) for a, b in zip(g_t1, g_sampling))
