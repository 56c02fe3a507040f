"""GRPO's loss pieces against values computed by hand."""

import math

import pytest
import torch

from cropi.rl.grpo import (
    clipped_surrogate,
    group_advantages,
    grpo_loss,
    low_var_kl,
    masked_mean,
)


def test_advantages_are_group_normalised_with_unbiased_std():
    adv = group_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0]]), eps=1e-4)
    # mean 0.5, unbiased std sqrt(((0.5^2)*4)/3) = 0.57735
    expected = 0.5 / (math.sqrt(1 / 3) + 1e-4)
    assert torch.allclose(adv, torch.tensor([[expected, -expected, -expected, expected]]), atol=1e-6)


def test_a_group_with_equal_rewards_has_zero_advantage():
    assert torch.equal(group_advantages(torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])), torch.zeros(2, 3))


def test_groups_are_normalised_independently():
    adv = group_advantages(torch.tensor([[0.0, 1.0], [0.0, 10.0]]), eps=0.0)
    assert torch.allclose(adv[0], adv[1])


def test_surrogate_without_clipping_is_minus_ratio_times_advantage():
    logp = torch.log(torch.tensor([[1.1, 0.9]]))
    old = torch.zeros(1, 2)
    loss, frac = clipped_surrogate(logp, old, torch.tensor([2.0]), torch.ones(1, 2), clip_eps=0.2)
    assert loss.item() == pytest.approx(-(1.1 * 2 + 0.9 * 2) / 2)
    assert frac.item() == 0.0


def test_surrogate_clips_ratio_in_the_direction_the_advantage_favours():
    old = torch.zeros(1, 1)
    mask = torch.ones(1, 1)
    # A > 0, ratio 1.5: the gain is capped at 1.2 * A.
    loss, frac = clipped_surrogate(torch.log(torch.tensor([[1.5]])), old, torch.tensor([1.0]), mask, 0.2)
    assert loss.item() == pytest.approx(-1.2) and frac.item() == 1.0
    # A > 0, ratio 0.5: pessimistic min keeps the unclipped (worse) value.
    loss, frac = clipped_surrogate(torch.log(torch.tensor([[0.5]])), old, torch.tensor([1.0]), mask, 0.2)
    assert loss.item() == pytest.approx(-0.5) and frac.item() == 0.0
    # A < 0, ratio 0.5: capped at 0.8 * A.
    loss, frac = clipped_surrogate(torch.log(torch.tensor([[0.5]])), old, torch.tensor([-1.0]), mask, 0.2)
    assert loss.item() == pytest.approx(0.8) and frac.item() == 1.0


def test_clipped_tokens_get_no_gradient():
    logp = torch.log(torch.tensor([[1.5, 1.0]])).requires_grad_()
    loss, _ = clipped_surrogate(logp, torch.zeros(1, 2), torch.tensor([1.0]), torch.ones(1, 2), 0.2)
    loss.backward()
    assert logp.grad[0, 0].item() == 0.0 and logp.grad[0, 1].item() != 0.0


def test_token_mean_ignores_padding():
    values = torch.tensor([[1.0, 2.0, 100.0], [3.0, 100.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert masked_mean(values, mask).item() == pytest.approx(2.0)


def test_low_var_kl_matches_the_k3_formula():
    logp = torch.tensor([math.log(0.5)])
    ref = torch.tensor([math.log(0.25)])
    # d = ln(0.25/0.5) = -ln 2; exp(d) - d - 1 = 0.5 + ln 2 - 1
    assert low_var_kl(logp, ref).item() == pytest.approx(0.5 + math.log(2) - 1, abs=1e-6)
    assert low_var_kl(ref, ref).item() == 0.0
    assert low_var_kl(torch.tensor([0.0]), torch.tensor([50.0])).item() == 10.0  # clamped


def test_total_loss_combines_terms_with_their_coefficients():
    logp = torch.log(torch.tensor([[0.5, 0.5]]))
    old = logp.clone()
    ref = torch.log(torch.tensor([[0.25, 0.5]]))
    entropy = torch.tensor([[1.0, 3.0]])
    loss, stats = grpo_loss(logp, old, ref, entropy, torch.tensor([1.0]), torch.ones(1, 2),
                            clip_eps=0.2, kl_coef=0.1, entropy_coef=0.01)
    kl = (0.5 + math.log(2) - 1 + 0.0) / 2
    assert stats["kl"] == pytest.approx(kl, abs=1e-6)
    assert stats["entropy"] == pytest.approx(2.0)
    assert loss.item() == pytest.approx(-1.0 + 0.1 * kl - 0.01 * 2.0, abs=1e-6)
