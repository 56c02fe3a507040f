"""Chunks of offline groups for batched POPI (`popi_grouped.py`).

A chunk is scored in one pass: its prompts left-padded to the longest one
(run once per group) and its responses right-padded to the longest one (run
once each). Groups come sorted by length, so padding stays small; a chunk
holds at most `batch_tokens` padded tokens, and at most `max_groups` groups,
since each group of a chunk holds its own copy of one layer's weight
gradient while it is formed.
"""

from __future__ import annotations

from collections.abc import Sequence

from cropi.influence.offline import OfflineGroup
from cropi.rl.batch import TokenBatch, collate
from cropi.rollout.base import Trajectory


def padded_tokens(groups: Sequence[OfflineGroup]) -> int:
    """Tokens one pass over these groups computes: each prompt once, each response once."""
    prompt = max(len(g.prompt_ids) for g in groups)
    response = max(len(r) for g in groups for r in g.response_ids)
    return len(groups) * prompt + sum(len(g.response_ids) for g in groups) * response


def chunks(groups: Sequence[OfflineGroup], batch_tokens: int, max_groups: int | None = None) -> list[list[int]]:
    """Indices of consecutive groups that share a pass: within `batch_tokens` padded tokens and
    `max_groups` groups (one group at least); a new chunk also starts where the number of
    responses or the sampling temperature changes (a chunk shares both)."""
    out: list[list[int]] = []
    current: list[int] = []
    for i, g in enumerate(groups):
        if current:
            first = groups[current[0]]
            same = (len(first.rewards), first.temperature) == (len(g.rewards), g.temperature)
            full = max_groups is not None and len(current) >= max_groups
            if not same or full or padded_tokens([groups[j] for j in current] + [g]) > batch_tokens:
                out.append(current)
                current = []
        current.append(i)
    if current:
        out.append(current)
    return out


def collate_groups(groups: Sequence[OfflineGroup], pad_id: int) -> TokenBatch:
    """One batch of every response of every group, group-major."""
    return collate([Trajectory(prompt_ids=g.prompt_ids, response_ids=r, logprobs=lp, text="", finished=True)
                    for g in groups for r, lp in zip(g.response_ids, g.logprobs)], pad_id)
