"""Run metrics: one JSON object per line in `metrics.jsonl`, mirrored to
TensorBoard. The JSONL file is the source of truth (plots are redrawn from
it); each line is flushed as written so a killed run keeps what it logged."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch.utils.tensorboard import SummaryWriter


class MetricsLog:
    def __init__(self, run_dir: Path, append: bool = False):
        self.path = run_dir / "metrics.jsonl"
        self._file = self.path.open("a" if append else "w")
        self._tb = SummaryWriter(str(run_dir / "tb"))

    def log(self, kind: str, step: int, **values: Any) -> None:
        record = {"kind": kind, "step": step, **values}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        for key, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self._tb.add_scalar(f"{kind}/{key}", value, step)

    def close(self) -> None:
        self._file.close()
        self._tb.close()


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    records = []
    with path.open() as f:
        for line in f:
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    # A run killed mid-write leaves a partial last line; skip it.
                    continue
    return records


def truncate_metrics(run_dir: Path, last_step: int) -> None:
    """Drop records after `last_step` (written by a run killed before it saved its state)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return
    kept = [r for r in read_metrics(run_dir) if r["step"] <= last_step]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    tmp.replace(path)
