"""Run metrics: one JSON object per line in `metrics.jsonl`, and the trackers
that mirror them as they are logged (TensorBoard, W&B, MLflow; `tracking:`
in the spec).

The JSONL file is the source of truth (plots are redrawn from it); each
line is flushed as written so a killed run keeps what it logged. A record
is `{"kind", "step", ...}`: kind `train`, `eval` (one per set),
`eval_summary`, `samples`, or `selection` (one per stage, at its start).

    base.py          the `Tracker` interface, opening the configured backends
    names.py         scalar names, the extra to install
    tensorboard.py   wandb_backend.py   mlflow_backend.py   the backends
    observer.py      `TrackingObserver`: a run's records to metrics.jsonl and its trackers, once each
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any


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


def metrics_text(records: Iterable[dict[str, Any]]) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def write_metrics(path: Path, records: Iterable[dict[str, Any]]) -> None:
    """Replace `path` with these records, all or nothing (a rename)."""
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text(metrics_text(records))
    tmp.replace(path)


def truncate_metrics(run_dir: Path, last_step: int) -> None:
    """Drop records after `last_step` (written by a run killed before it saved its state)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return
    write_metrics(path, [r for r in read_metrics(run_dir) if r["step"] <= last_step])
