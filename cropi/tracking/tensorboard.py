"""TensorBoard: scalars in an event file, flushed after every record so that
`tensorboard --logdir` shows a run while it trains."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch.utils.tensorboard import SummaryWriter

from cropi.tracking.names import scalars


class TensorBoardTracker:
    def __init__(self, log_dir: Path, purge_step: int | None = None):
        self.log_dir = Path(log_dir)
        self._writer = SummaryWriter(str(self.log_dir), purge_step=purge_step)

    def log(self, kind: str, step: int, values: dict[str, Any]) -> None:
        for name, value in scalars(kind, values).items():
            self._writer.add_scalar(name, value, step)
        self._writer.flush()

    def log_stage(self, stage: int, step: int, stats: dict[str, Any]) -> None:
        self.log("selection", step, {"stage": stage, **stats})

    def close(self) -> None:
        self._writer.close()
