"""GRPO's pieces as pure tensor functions, each small enough to check by hand.

Conventions: per-token tensors are [B, R] with a float `mask` marking real
response tokens; "token-mean" averages over every real token of the batch.
"""

from __future__ import annotations

import torch


def group_advantages(rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """A_i = (r_i - mean(r)) / (std(r) + eps) within each group (row).

    `rewards` is [num_groups, group_size]; std is unbiased (torch.std), as in
    docs/design.md §2.2. A group whose rewards are all equal gets A = 0.
    """
    mean = rewards.mean(dim=-1, keepdim=True)
    std = rewards.std(dim=-1, keepdim=True)
    return (rewards - mean) / (std + eps)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def seq_mean_token_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over each sequence's tokens, then over sequences (the original GRPO, and POPI's L_x)."""
    return ((values * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()


AGGREGATIONS = {"token-mean": masked_mean, "seq-mean-token-mean": seq_mean_token_mean}


def clipped_surrogate(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
    loss_agg: str = "token-mean",
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped policy loss; returns (loss, fraction of tokens clipped).

    `advantages` is per sequence [B] or per token [B, R]. `loss_agg` is
    "token-mean" (the default, DAPO/verl style) or "seq-mean-token-mean".
    """
    if advantages.dim() == 1:
        advantages = advantages[:, None]
    ratio = torch.exp(logp - old_logp)
    unclipped = -ratio * advantages
    clipped = -torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * advantages
    loss = AGGREGATIONS[loss_agg](torch.maximum(unclipped, clipped), mask)
    clip_frac = masked_mean((clipped > unclipped).float(), mask)
    return loss, clip_frac


def low_var_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(pi || pi_ref): exp(d) - d - 1 with d = ref - logp.

    Non-negative and unbiased for samples from pi; clamped to [-10, 10] as in
    verl's `low_var_kl` because a single token can make it explode.
    """
    d = ref_logp - logp
    return torch.clamp(torch.exp(d) - d - 1, min=-10.0, max=10.0)


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor | None,
    entropy: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
    kl_coef: float,
    entropy_coef: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Total loss = clipped surrogate + kl_coef * KL - entropy_coef * entropy (token-means)."""
    pg, clip_frac = clipped_surrogate(logp, old_logp, advantages, mask, clip_eps)
    kl = masked_mean(low_var_kl(logp, ref_logp), mask) if ref_logp is not None else torch.zeros(())
    ent = masked_mean(entropy, mask)
    loss = pg + kl_coef * kl - entropy_coef * ent
    stats = {
        "pg_loss": pg.item(),
        "kl": kl.item(),
        "entropy": ent.item(),
        "clip_frac": clip_frac.item(),
    }
    return loss, stats
