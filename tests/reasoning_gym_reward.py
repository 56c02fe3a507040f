"""A user's reward function as a test job names it (`tests.reasoning_gym_reward:score`):
reasoning-gym's own scorer for the row's dataset, plus a test-only partial credit.

The credit exists because the test model is random: a real scorer gives it all-zero rewards,
so no prompt would be eligible and nothing could be selected. It is deterministic and depends
only on the response text, so the test can recompute every reward exactly."""

from __future__ import annotations

import json

import reasoning_gym


def partial_credit(response: str) -> float:
    return 0.5 * float(sum(map(ord, response)) % 3 == 0)


def reasoning_gym_score(response: str, reference: str, row: dict) -> float:
    meta = json.loads(row["extra_info"]["metadata"])
    entry = {"question": row.get("question", ""), "answer": reference, "metadata": meta}
    return float(reasoning_gym.get_score_answer_fn(meta["source_dataset"])(response, entry))


def score(response: str, reference: str, row: dict) -> float:
    return reasoning_gym_score(response, reference, row) + partial_credit(response)
