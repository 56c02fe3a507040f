"""A run's progress: which stage and step it is at and what it measured.

The trainer keeps it, with the weights and optimizer state, in one store
object (`jobs/<job>/trainer/state.pt`) rewritten after every completed step:
a crash can never leave weights of step s beside the progress of step s-1.
Everything else a run needs is either a pure function of (spec, seed, step)
— batches, rollout seeds, evaluation seeds — or in the store as well
(offline trajectories, gradients, selections, stage checkpoints).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Progress:
    step: int = 0  # global steps completed
    stage: int = 0  # stage in progress
    step_in_stage: int = 0  # steps of that stage completed
    before: dict[str, Any] = field(default_factory=dict)  # evaluation at step 0
    after: dict[str, Any] = field(default_factory=dict)  # latest evaluation
    stage_before: dict[str, Any] = field(default_factory=dict)  # evaluation when the stage started
    stages: list[dict] = field(default_factory=list)  # finished stages' summaries
    stopped_early: bool = False
