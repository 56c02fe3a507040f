"""Turning trajectories into padded tensors and recomputing their log-probs.

Layout: ``[pad..., prompt, response, pad...]`` — prompts left-padded to a
common width, responses right-padded — the same layout the HF engine
generates in, so teacher-forced log-probs match the sampled ones closely.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from cropi.rollout.base import Trajectory


@dataclass
class TokenBatch:
    input_ids: torch.Tensor  # [B, P + R]
    attention_mask: torch.Tensor  # [B, P + R]
    position_ids: torch.Tensor  # [B, P + R]
    response_mask: torch.Tensor  # [B, R] float, 1 on real response tokens
    response_ids: torch.Tensor  # [B, R]
    old_logprobs: torch.Tensor  # [B, R] from the generating policy
    prompt_width: int

    def to(self, device: torch.device | str) -> TokenBatch:
        return TokenBatch(
            **{k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        )

    def rows(self, lo: int, hi: int) -> TokenBatch:
        """Sequences [lo, hi) (same padded widths)."""
        return TokenBatch(
            **{k: (v[lo:hi] if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        )


def collate(trajectories: Sequence[Trajectory], pad_id: int) -> TokenBatch:
    P = max(len(t.prompt_ids) for t in trajectories)
    R = max(1, max(len(t.response_ids) for t in trajectories))
    ids, mask, resp, resp_mask, old = [], [], [], [], []
    for t in trajectories:
        lp, lr = len(t.prompt_ids), len(t.response_ids)
        ids.append([pad_id] * (P - lp) + t.prompt_ids + t.response_ids + [pad_id] * (R - lr))
        mask.append([0] * (P - lp) + [1] * (lp + lr) + [0] * (R - lr))
        resp.append(t.response_ids + [pad_id] * (R - lr))
        resp_mask.append([1.0] * lr + [0.0] * (R - lr))
        old.append(list(t.logprobs) + [0.0] * (R - lr))
    attention = torch.tensor(mask)
    return TokenBatch(
        input_ids=torch.tensor(ids),
        attention_mask=attention,
        position_ids=(attention.cumsum(-1) - 1).clamp(min=0),
        response_mask=torch.tensor(resp_mask),
        response_ids=torch.tensor(resp),
        old_logprobs=torch.tensor(old, dtype=torch.float32),
        prompt_width=P,
    )


def response_logits(model: PreTrainedModel, batch: TokenBatch, temperature: float = 1.0) -> torch.Tensor:
    """Logits [B, R, V] (fp32, divided by temperature) that predict each response token."""
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids)
    R = batch.response_ids.shape[1]
    # Position P-1+t predicts response token t.
    logits = out.logits[:, batch.prompt_width - 1 : batch.prompt_width - 1 + R].float()
    return logits / temperature


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)
