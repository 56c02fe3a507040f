"""Weights & Biases (the `tracking` extra). The API key comes from the
environment (WANDB_API_KEY, or `wandb login`'s netrc), never from the spec.

The run's id is the run key (`base.run_key`), with resume="allow": a resumed
run, or the next stage on another trainer, continues the same W&B run.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from cropi.errors import InputError
from cropi.spec import JobSpec
from cropi.tracking.names import EXTRA, scalars


class WandbTracker:
    def __init__(self, spec: JobSpec, key: str, files_dir: Path | None = None):
        try:
            import wandb
        except ImportError as err:
            raise InputError(f"tracking.backends lists wandb, but it cannot be imported ({err}); {EXTRA}") from None
        cfg = spec.tracking.wandb
        if files_dir is not None and not os.environ.get("WANDB_DIR"):
            files_dir.mkdir(parents=True, exist_ok=True)
        else:
            files_dir = None  # WANDB_DIR, else W&B's default
        try:
            self._run = wandb.init(
                project=cfg.project or os.environ.get("WANDB_PROJECT") or "cropi", entity=cfg.entity,
                mode=cfg.mode, group=cfg.group, tags=cfg.tags or None, name=cfg.run_name or spec.name,
                id=key, resume="allow", reinit="create_new", dir=str(files_dir) if files_dir else None,
                config=spec.model_dump(mode="json"), job_type="curriculum-rl",
            )
        except wandb.errors.UsageError as err:  # e.g. online without an API key
            raise InputError(f"tracking: W&B refused to start the run: {err}") from None

    def log(self, kind: str, step: int, values: dict[str, Any]) -> None:
        data = scalars(kind, values)
        if data:
            self._run.log(data, step=step)

    def log_stage(self, stage: int, step: int, stats: dict[str, Any]) -> None:
        self.log("selection", step, {"stage": stage, **stats})

    def close(self) -> None:
        self._run.finish()
