"""`TrackingObserver`: a run's metric records, as the train task logs them,
appended to `metrics.jsonl` (flushed) and sent to the trackers, each record
once.

A record is identified by (kind, step, set, stage). The records a run had
stored before (a resumed run's, an earlier stage's on another worker) are
`seen` from the start, so that a replay of them (the Ray executor's, after
its ranks ran the stage) is not written twice. `local_tracking` sets up the
embedded run's: metrics.jsonl and tb/ rebuilt from the stored records (the
store is the source of truth; a killed run may have logged a step it never
saved), then the live records appended.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from cropi.runtime.tasks import RunObserver
from cropi.spec import JobSpec
from cropi.tracking import metrics_text, write_metrics
from cropi.tracking.base import Tracker, close_all, open_trackers
from cropi.tracking.tensorboard import TensorBoardTracker

log = logging.getLogger(__name__)


def record_id(record: dict[str, Any]) -> tuple:
    return record.get("kind"), record.get("step"), record.get("set"), record.get("stage")


def send(tracker: Tracker, record: dict[str, Any]) -> None:
    kind, step = record["kind"], record["step"]
    values = {k: v for k, v in record.items() if k not in ("kind", "step")}
    if kind == "selection":
        tracker.log_stage(int(values.pop("stage", 0)), step, values)
    else:
        tracker.log(kind, step, values)


class TrackingObserver(RunObserver):
    """Records to `jsonl` (None: no file) and `trackers`, once each; then whatever `inner` shows."""

    def __init__(self, trackers: list[Tracker], jsonl: Path | None = None, seen: Iterable[dict] = (),
                 inner: RunObserver | None = None, warn: Callable[[str], None] | None = None):
        self.trackers, self.inner = list(trackers), inner or RunObserver()
        self.warn = warn or (lambda message: log.warning("%s", message))
        self._seen = {record_id(r) for r in seen}
        self._file = jsonl.open("a") if jsonl is not None else None
        self._failed: set[int] = set()  # trackers that failed once (warned once, then skipped)

    def stage_started(self, stage: int, progress: Any, selection: Any) -> None:
        self.inner.stage_started(stage, progress, selection)

    def step(self, progress: Any, stats: dict[str, float]) -> None:
        self.inner.step(progress, stats)

    def metric(self, record: dict[str, Any]) -> None:
        rid = record_id(record)
        if rid not in self._seen:
            self._seen.add(rid)
            self._write(record)
        self.inner.metric(record)

    def _write(self, record: dict[str, Any]) -> None:
        if self._file is not None:
            self._file.write(metrics_text([record]))
            self._file.flush()
        for i, tracker in enumerate(self.trackers):
            if i in self._failed:
                continue
            try:
                send(tracker, record)
            except Exception as err:  # a tracker away (its server, the network) never stops training
                self._failed.add(i)
                self.warn(f"tracking: {type(tracker).__name__} failed ({type(err).__name__}: {err}); "
                          "it gets no more records in this task (metrics.jsonl and the store keep them)")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        close_all(self.trackers)
        self.trackers = []


def local_tracking(spec: JobSpec, run_dir: Path, key: str, stored: list[dict],
                   warn: Callable[[str], None] | None = None) -> TrackingObserver:
    """The embedded run's: metrics.jsonl and tb/ in `run_dir` rebuilt from `stored` (the records its
    store holds; [] on a fresh run), W&B's files under `run_dir` (unless WANDB_DIR), then live."""
    write_metrics(run_dir / "metrics.jsonl", stored)
    shutil.rmtree(run_dir / "tb", ignore_errors=True)
    trackers = open_trackers(spec, key, run_dir / "tb", run_dir)
    try:
        for tracker in trackers:
            if isinstance(tracker, TensorBoardTracker):  # the others were sent these when they were logged
                for record in stored:
                    send(tracker, record)
    except BaseException:
        close_all(trackers)
        raise
    return TrackingObserver(trackers, run_dir / "metrics.jsonl", seen=stored, warn=warn)
