"""The rollout-engine interface: prompts in, sampled responses with the
per-token log-probabilities of the policy that generated them out.

Every engine (HF on CPU, vLLM on GPU) returns the same `Trajectory`, so the
GRPO trainer and the influence engine never know which one ran.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 16
    greedy: bool = False
    seed: int = 0


@dataclass
class Trajectory:
    """One sampled response.

    `logprobs[t]` is log softmax(logits / temperature) of `response_ids[t]`
    under the generating policy (the full tempered distribution, before any
    top-p truncation: that is what the trainer can recompute). Greedy
    decoding reports temperature-1 log-probs. `response_ids` ends with EOS
    when the model stopped by itself (`finished`).
    """

    prompt_ids: list[int]
    response_ids: list[int]
    logprobs: list[float]
    text: str
    finished: bool
    temperature: float = 1.0


class RolloutEngine(Protocol):
    def generate(self, prompts: Sequence[str], n: int, sampling: SamplingParams) -> list[list[Trajectory]]:
        """`n` responses for each prompt, grouped per prompt in input order."""
        ...
