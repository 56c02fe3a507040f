"""Batched POPI: the per-prompt gradients of many offline groups in one pass.

The per-prompt loop (`POPIProjector.project_group`) runs one small forward
and backward per prompt; on a small model that is bound by per-call
overhead, not arithmetic. Here a chunk of groups is collated into one
padded batch and `torch.func.vmap(grad(...))` over `functional_call` gives
every group's gradient of its own POPI loss at once; each is then sketched
by the projector, so a flat gradient is never formed.

The attention mask is built here as a 4D additive mask: transformers'
own mask builder branches on tensor values, which vmap cannot trace.
Padded query rows attend to themselves only, which keeps them finite; they
are never part of a loss. The result equals the per-prompt path within fp32
rounding (a chunk pads to common widths, so matmul shapes differ) and is
bit-identical run to run.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.func import functional_call, grad, vmap
from transformers import PreTrainedModel

from cropi.influence.offline import OfflineGroup
from cropi.rl.batch import TokenBatch, collate, response_logits, token_logprobs
from cropi.rl.grpo import group_advantages
from cropi.rollout.base import Trajectory


def chunks(groups: Sequence[OfflineGroup], batch_tokens: int) -> list[list[int]]:
    """Indices of consecutive groups whose padded batch (groups x responses x widest sequence)
    stays within `batch_tokens` (one group at least); a new chunk also starts where the
    number of responses or the sampling temperature changes (a chunk shares both)."""
    out: list[list[int]] = []
    current: list[int] = []
    widest = 0
    for i, g in enumerate(groups):
        width = len(g.prompt_ids) + max(len(r) for r in g.response_ids)
        same = current and (len(groups[current[0]].rewards), groups[current[0]].temperature) == (
            len(g.rewards), g.temperature)
        if current and (not same or (len(current) + 1) * len(g.rewards) * max(widest, width) > batch_tokens):
            out.append(current)
            current, widest = [], 0
        current.append(i)
        widest = max(widest, width)
    if current:
        out.append(current)
    return out


def _collate_groups(groups: Sequence[OfflineGroup], pad_id: int) -> TokenBatch:
    return collate([Trajectory(prompt_ids=g.prompt_ids, response_ids=r, logprobs=lp, text="", finished=True)
                    for g in groups for r, lp in zip(g.response_ids, g.logprobs)], pad_id)


def additive_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[N, 1, W, W]: causal and padding, 0 where attended and the dtype's minimum elsewhere."""
    width = attention_mask.shape[1]
    causal = torch.tril(torch.ones(width, width, dtype=torch.bool, device=attention_mask.device))
    allowed = attention_mask[:, None, None, :].bool() & causal
    allowed |= torch.eye(width, dtype=torch.bool, device=attention_mask.device)
    return torch.zeros(allowed.shape, dtype=dtype, device=attention_mask.device).masked_fill(
        ~allowed, torch.finfo(dtype).min)


def batched_gradients(model: PreTrainedModel, groups: Sequence[OfflineGroup], pad_id: int, adv_eps: float,
                      temperature: float | None = None, behaviour: PreTrainedModel | None = None,
                      ) -> dict[str, torch.Tensor]:
    """name -> [len(groups), *shape]: each group's gradient of its POPI loss (`popi.popi_loss`).

    Every group must have mixed rewards (an ineligible one has no gradient) and the chunk
    must share its number of responses and sampling temperature (`chunks`).
    """
    n_groups, n = len(groups), len(groups[0].rewards)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    batch = _collate_groups(groups, pad_id).to(device)
    sampled_at = groups[0].temperature
    rescore = temperature is not None and temperature != sampled_at
    t = temperature if rescore else sampled_at
    if rescore:
        with torch.no_grad():
            old = token_logprobs(response_logits(behaviour or model, batch, t), batch.response_ids)
    else:
        old = batch.old_logprobs
    advantages = group_advantages(torch.tensor([g.rewards for g in groups], dtype=torch.float32), adv_eps).to(device)
    mask4 = additive_mask(batch.attention_mask, dtype)
    prompt_width, resp_width = batch.prompt_width, batch.response_ids.shape[1]
    params = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}

    def group_loss(params, input_ids, attention, positions, response_ids, response_mask, old_logp, adv):
        out = functional_call(model, params, (), {"input_ids": input_ids, "attention_mask": attention,
                                                  "position_ids": positions})
        logits = out.logits[:, prompt_width - 1: prompt_width - 1 + resp_width].float() / t
        logp = token_logprobs(logits, response_ids)
        rho = torch.exp(logp - old_logp)
        per_sequence = (rho * response_mask).sum(-1) / response_mask.sum(-1).clamp(min=1.0)
        return -(per_sequence * adv).mean()

    def per_group(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(n_groups, n, *x.shape[1:])

    return vmap(grad(group_loss), in_dims=(None, 0, 0, 0, 0, 0, 0, 0))(
        params, per_group(batch.input_ids), per_group(mask4), per_group(batch.position_ids),
        per_group(batch.response_ids), per_group(batch.response_mask), per_group(old), advantages)
