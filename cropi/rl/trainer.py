"""A single-process GRPO trainer: one optimizer step per rollout batch.

The distributed trainer (DeepSpeed ZeRO-3 on Ray Train) runs the same
`grpo_loss` on its shard of the batch; this class is the reference it is
checked against.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedModel

from cropi.rl.batch import (
    TokenBatch,
    collate,
    response_logits,
    token_entropy,
    token_logprobs,
)
from cropi.rl.grpo import group_advantages, grpo_loss
from cropi.rollout.base import Trajectory
from cropi.spec import RLSpec


def _slice(batch: TokenBatch, lo: int, hi: int) -> TokenBatch:
    return TokenBatch(
        **{k: (v[lo:hi] if isinstance(v, torch.Tensor) else v) for k, v in batch.__dict__.items()}
    )


class GRPOTrainer:
    def __init__(
        self,
        model: PreTrainedModel,
        ref_model: PreTrainedModel | None,
        pad_id: int,
        cfg: RLSpec,
        temperature: float = 1.0,
    ):
        self.model = model
        self.ref_model = ref_model
        self.pad_id = pad_id
        self.cfg = cfg
        self.temperature = temperature
        self.optimizer = self._new_optimizer()
        if ref_model is not None:
            ref_model.eval().requires_grad_(False)

    def _new_optimizer(self) -> torch.optim.Optimizer:
        if self.cfg.optimizer == "sgd":
            opt = torch.optim.SGD(self.model.parameters(), lr=self.cfg.lr, momentum=self.cfg.momentum,
                                  weight_decay=self.cfg.weight_decay)
        else:
            opt = torch.optim.AdamW(self.model.parameters(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        warmup = self.cfg.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0
        )
        return opt

    def reset_optimizer(self) -> None:
        self.optimizer = self._new_optimizer()

    @torch.no_grad()
    def _ref_logprobs(self, batch: TokenBatch) -> torch.Tensor | None:
        if self.ref_model is None or self.cfg.kl_coef == 0:
            return None
        parts = []
        for lo in range(0, batch.input_ids.shape[0], self.cfg.micro_batch):
            mb = _slice(batch, lo, lo + self.cfg.micro_batch)
            parts.append(token_logprobs(response_logits(self.ref_model, mb, self.temperature), mb.response_ids))
        return torch.cat(parts)

    def step(self, groups: Sequence[Sequence[Trajectory]], rewards: Sequence[Sequence[float]]) -> dict[str, float]:
        """One GRPO update on `groups` (responses per prompt) with their rewards."""
        reward_t = torch.tensor(rewards, dtype=torch.float32)
        advantages = group_advantages(reward_t, self.cfg.adv_eps).flatten()
        device = next(self.model.parameters()).device
        batch = collate([t for g in groups for t in g], self.pad_id).to(device)
        advantages = advantages.to(device)
        ref_logp = self._ref_logprobs(batch)
        total_tokens = batch.response_mask.sum().clamp(min=1.0)
        self.model.train()
        stats: dict[str, float] = {}
        for _ in range(self.cfg.ppo_epochs):
            self.optimizer.zero_grad(set_to_none=True)
            sums: dict[str, float] = {}
            for lo in range(0, batch.input_ids.shape[0], self.cfg.micro_batch):
                hi = lo + self.cfg.micro_batch
                mb = _slice(batch, lo, hi)
                logits = response_logits(self.model, mb, self.temperature)
                logp = token_logprobs(logits, mb.response_ids)
                loss, mb_stats = grpo_loss(
                    logp,
                    mb.old_logprobs,
                    ref_logp[lo:hi] if ref_logp is not None else None,
                    token_entropy(logits),
                    advantages[lo:hi],
                    mb.response_mask,
                    clip_eps=self.cfg.clip_eps,
                    kl_coef=self.cfg.kl_coef,
                    entropy_coef=self.cfg.entropy_coef,
                )
                # Weight each micro-batch by its tokens so the sum is the batch token-mean.
                weight = (mb.response_mask.sum() / total_tokens).item()
                (loss * weight).backward()
                for k, v in mb_stats.items():
                    sums[k] = sums.get(k, 0.0) + v * weight
                sums["loss"] = sums.get("loss", 0.0) + loss.item() * weight
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm)
            self.optimizer.step()
            stats = {**sums, "grad_norm": float(grad_norm), "lr": self.scheduler.get_last_lr()[0]}
        self.scheduler.step()
        stats.update(batch_stats(reward_t, batch.response_mask))
        return stats


def batch_stats(rewards: torch.Tensor, response_mask: torch.Tensor) -> dict[str, float]:
    """What a GRPO step reports about its batch: rewards [groups, n], response lengths."""
    flat = rewards.std(-1) == 0  # groups whose responses all got the same reward (no advantage)
    return {
        "reward_mean": rewards.mean().item(),
        "response_len": response_mask.sum(-1).mean().item(),
        "solved_groups": flat.logical_and(rewards[:, 0] > 0).float().mean().item(),
        "zero_var_groups": flat.float().mean().item(),
    }
