"""The GRPO trainer: one optimizer step per rollout batch, the same loop on
every backend.

A `Backend` owns where the weights live and how a gradient becomes a step:

    TorchBackend   one process, torch's optimizer (the reference)
    ZeroBackend    DeepSpeed ZeRO-3 ranks, each on its shard of the batch
                   (`cropi.rl.zero3`, imported only where DeepSpeed is installed)

`GRPOTrainer.step` is the loop both run: micro-batches weighted by their
share of the batch's tokens (so the sum is the batch token-mean), the GRPO
loss of `grpo.py`, one optimizer step per PPO epoch, the warmup schedule
stepped once per GRPO step. The trainers then differ only by the order of
floating-point sums.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from transformers import PreTrainedModel

from cropi.rl.batch import TokenBatch, collate, response_logits, token_entropy, token_logprobs
from cropi.rl.grpo import group_advantages, grpo_loss
from cropi.rollout.base import Trajectory
from cropi.spec import RLSpec

Pass = tuple[int, int]  # the [lo, hi) rows of the batch one forward/backward runs on


def warmup_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup to the optimizer's lr over `warmup_steps` GRPO steps, then constant."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0
    )


class Backend(Protocol):
    device: torch.device
    module: torch.nn.Module  # what the forward pass runs through
    reference: torch.nn.Module | None  # the frozen KL reference, placed as the backend places it
    scheduler: torch.optim.lr_scheduler.LambdaLR

    def passes(self, n: int, rows: int) -> list[Pass]:
        """The row ranges this process runs for a batch of `n` sequences, `rows` at a time (an empty
        range: a stand-in pass)."""
        ...

    def zero_grad(self) -> None: ...

    def backward(self, loss: torch.Tensor, weight: float) -> None:
        """Accumulate the gradient of `loss * weight` (the micro-batch's share of the batch's tokens)."""
        ...

    def optimizer_step(self) -> float:
        """Clip, step the optimizer, return the gradient norm before clipping."""
        ...

    def reduce(self, sums: dict[str, float]) -> dict[str, float]:
        """The batch's statistic sums from this process's partial ones."""
        ...

    def reset_optimizer(self) -> None: ...


class TorchBackend:
    """The model in this process, torch's SGD or AdamW."""

    def __init__(self, model: PreTrainedModel, ref_model: PreTrainedModel | None, cfg: RLSpec):
        self.module, self.reference, self.cfg = model, ref_model, cfg
        self.device = next(model.parameters()).device
        self.optimizer = self._new_optimizer()

    def _new_optimizer(self) -> torch.optim.Optimizer:
        cfg = self.cfg
        if cfg.optimizer == "sgd":
            opt = torch.optim.SGD(self.module.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                  weight_decay=cfg.weight_decay)
        else:
            opt = torch.optim.AdamW(self.module.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = warmup_schedule(opt, cfg.warmup_steps)
        return opt

    def passes(self, n: int, rows: int) -> list[Pass]:
        return [(lo, min(n, lo + rows)) for lo in range(0, n, rows)]

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor, weight: float) -> None:
        (loss * weight).backward()

    def optimizer_step(self) -> float:
        grad_norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.cfg.max_grad_norm)
        self.optimizer.step()
        return float(grad_norm)

    def reduce(self, sums: dict[str, float]) -> dict[str, float]:
        return sums

    def reset_optimizer(self) -> None:
        self.optimizer = self._new_optimizer()


class GRPOTrainer:
    def __init__(self, model: PreTrainedModel, ref_model: PreTrainedModel | None, pad_id: int, cfg: RLSpec,
                 temperature: float = 1.0, backend: Backend | None = None):
        """`backend` defaults to a `TorchBackend` of `model` and `ref_model`."""
        if ref_model is not None:
            ref_model.eval().requires_grad_(False)
        self.model = model
        self.pad_id, self.cfg, self.temperature = pad_id, cfg, temperature
        self.backend = backend or TorchBackend(model, ref_model, cfg)

    # The single-process trainer's state, as `Policy` saves and restores it.
    @property
    def ref_model(self) -> torch.nn.Module | None:
        return self.backend.reference

    @ref_model.setter
    def ref_model(self, model: torch.nn.Module) -> None:
        self.backend.reference = model

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.backend.optimizer

    @property
    def scheduler(self) -> torch.optim.lr_scheduler.LambdaLR:
        return self.backend.scheduler

    def reset_optimizer(self) -> None:
        """Forget the optimizer's moments and restart the warmup."""
        self.backend.reset_optimizer()

    def rows_per_pass(self, batch: TokenBatch) -> int:
        """`rl.micro_batch` sequences, or as many as `rl.micro_batch_tokens` padded tokens hold."""
        if self.cfg.micro_batch_tokens:
            return max(1, self.cfg.micro_batch_tokens // batch.input_ids.shape[1])
        return self.cfg.micro_batch

    @torch.no_grad()
    def _ref_logprobs(self, batch: TokenBatch, passes: Sequence[Pass]) -> list[torch.Tensor | None]:
        ref = self.backend.reference
        if ref is None or self.cfg.kl_coef == 0:
            return [None] * len(passes)
        ref.eval()
        out = []
        for lo, hi in passes:
            mb = _pass_rows(batch, lo, hi)
            out.append(token_logprobs(response_logits(ref, mb, self.temperature), mb.response_ids))
        return out

    def step(self, groups: Sequence[Sequence[Trajectory]], rewards: Sequence[Sequence[float]]) -> dict[str, float]:
        """One GRPO update on `groups` (responses per prompt) with their rewards; stats are batch values.

        Under a distributed backend every process passes the same full batch.
        """
        backend = self.backend
        reward_t = torch.tensor(rewards, dtype=torch.float32)
        advantages = group_advantages(reward_t, self.cfg.adv_eps).flatten().to(backend.device)
        batch = collate([t for g in groups for t in g], self.pad_id).to(backend.device)
        passes = backend.passes(batch.input_ids.shape[0], self.rows_per_pass(batch))
        ref_logp = self._ref_logprobs(batch, passes)
        total_tokens = batch.response_mask.sum().clamp(min=1.0)
        backend.module.train()
        stats: dict[str, float] = {}
        for _ in range(self.cfg.ppo_epochs):
            backend.zero_grad()
            sums: dict[str, float] = {}
            for (lo, hi), ref_mb in zip(passes, ref_logp):
                mb = _pass_rows(batch, lo, hi)
                logits = response_logits(backend.module, mb, self.temperature)
                logp = token_logprobs(logits, mb.response_ids)
                loss, mb_stats = grpo_loss(
                    logp, mb.old_logprobs, ref_mb, token_entropy(logits),
                    advantages[lo:hi] if hi > lo else advantages[:1], mb.response_mask,
                    clip_eps=self.cfg.clip_eps, kl_coef=self.cfg.kl_coef, entropy_coef=self.cfg.entropy_coef,
                )
                # Each micro-batch weighs its share of the batch's tokens: the sum is the batch token-mean.
                weight = (mb.response_mask.sum() / total_tokens).item() if hi > lo else 0.0
                backend.backward(loss, weight)
                for k, v in mb_stats.items():
                    sums[k] = sums.get(k, 0.0) + v * weight
                sums["loss"] = sums.get("loss", 0.0) + loss.item() * weight
            lr = backend.scheduler.get_last_lr()[0]
            grad_norm = backend.optimizer_step()
            stats = {**backend.reduce(sums), "grad_norm": grad_norm, "lr": lr}
        backend.scheduler.step()
        stats.update(batch_stats(reward_t, batch.response_mask))
        return stats


def _pass_rows(batch: TokenBatch, lo: int, hi: int) -> TokenBatch:
    """The sequences of one pass; an empty range borrows row 0 (its loss is weighted by 0)."""
    return batch.rows(lo, hi) if hi > lo else batch.rows(0, 1)


def batch_stats(rewards: torch.Tensor, response_mask: torch.Tensor) -> dict[str, float]:
    """What a GRPO step reports about its batch: rewards [groups, n], response lengths."""
    flat = rewards.std(-1) == 0  # groups whose responses all got the same reward (no advantage)
    return {
        "reward_mean": rewards.mean().item(),
        "response_len": response_mask.sum(-1).mean().item(),
        "solved_groups": flat.logical_and(rewards[:, 0] > 0).float().mean().item(),
        "zero_var_groups": flat.float().mean().item(),
    }
