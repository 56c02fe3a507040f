"""`tiny_job(**sections)`: the small job most tests run, as a spec dict.

A section given replaces the base's section whole; a section given as None
is left out, so the spec's defaults apply to it. Other keys (`name`,
`executor`, ...) are added as given."""

from __future__ import annotations

import copy
from typing import Any

from .conftest import TEST_MODEL

BASE_JOB: dict[str, Any] = {
    "model": {"path": TEST_MODEL},
    "data": {
        "pool": {"source": "builtin:arith?digits=1-2", "size": 40},
        "validation": [{"name": "add1", "source": "builtin:arith?skills=add&digits=1", "size": 8}],
    },
    "rollout": {"n": 4, "max_new_tokens": 4},
    "offline": {"n_pool": 4, "n_valid": 4},
    "rl": {"batch_prompts": 2},
    "curriculum": {"selector": "cropi", "stages": 2, "steps_per_stage": 2, "select_ratio": 0.25},
    "influence": {"proj_dim": 128, "max_valid_prompts": 4},
    "eval": {"every": 100, "samples": 0},
}


def tiny_job(**sections: Any) -> dict[str, Any]:
    job = copy.deepcopy(BASE_JOB)
    for name, value in sections.items():
        if value is None:
            job.pop(name, None)
        else:
            job[name] = copy.deepcopy(value)
    return job
