from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Prompt:
    """One training or evaluation item.

    `id` is stable across runs for the same source and seed; selections and
    offline trajectories refer to prompts by it. `verifier` names the reward
    function (see `cropi.data.rewards`) so that a pool may mix data sources.
    """

    id: str
    text: str
    answer: str
    verifier: str = "int"
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


def row_label(prompt: Prompt) -> str:
    """Where `prompt` came from, for a message: its file and row, or (built-in prompts) its generated
    id; never a row's value (an `id_field` may hold anything, secrets included)."""
    if "where" in prompt.meta:
        return f"data file {prompt.meta['file']}, {prompt.meta['where']}" if "file" in prompt.meta \
            else prompt.meta["where"]
    return f"prompt {prompt.id}"
