"""Resumable run state: everything needed to continue a run exactly where
it stopped, in one file written atomically after every completed step.

One file, not several: a crash can never leave weights of step s beside the
progress record of step s-1. Everything else a run needs is either a pure
function of (spec, seed, step) — batches, rollout seeds, evaluation seeds —
or already in the object store (offline trajectories, gradients, selections).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch


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


def state_path(run_dir: Path) -> Path:
    return run_dir / "state" / "latest.pt"


def save_state(run_dir: Path, progress: Progress, model: torch.nn.Module, trainer) -> None:
    path = state_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "progress": asdict(progress),
        "model": model.state_dict(),
        "optimizer": trainer.optimizer.state_dict(),
        "scheduler": trainer.scheduler.state_dict(),
    }
    fd, tmp = tempfile.mkstemp(prefix=".latest.", dir=path.parent)
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def load_state(run_dir: Path, model: torch.nn.Module, trainer) -> Progress | None:
    path = state_path(run_dir)
    if not path.is_file():
        return None
    payload = torch.load(path, map_location="cpu", weights_only=False)
    model.load_state_dict(payload["model"])
    trainer.optimizer.load_state_dict(payload["optimizer"])
    trainer.scheduler.load_state_dict(payload["scheduler"])
    return Progress(**payload["progress"])
