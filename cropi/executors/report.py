"""What a job reports into the store at each stage end, written by its train
task (on a cluster, where nothing else keeps a run folder):

    jobs/<job>/report/metrics.jsonl   every record so far (the trainer's, as stored with its state)
    jobs/<job>/report/summary.json    steps, evaluations before / after, each finished stage
    jobs/<job>/report/curves.png      plot_run's curves of them

Each is rewritten whole at each stage end. The curves are drawn in a
scratch run folder (metrics, summary, spec and the stored selections); a
plot that fails is a warning event, never a failed stage.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from cropi.curriculum import layout
from cropi.curriculum.state import Progress
from cropi.runtime.store import LocalStore, ObjectStore
from cropi.spec import JobSpec
from cropi.tracking import metrics_text


def report_summary(spec: JobSpec, progress: Progress, targeted: list[str]) -> dict:
    p = asdict(progress)
    return {"job": spec.name, "steps": progress.step, "before": p["before"], "after": p["after"],
            "targeted": targeted, "stages": p["stages"], "stopped_early": progress.stopped_early,
            "complete": progress.stopped_early or progress.stage >= spec.curriculum.stages}


class StageReport:
    """A `TrainerJournal.on_stage_end`: the job's report objects, rewritten."""

    def __init__(self, store: ObjectStore, spec: JobSpec, targeted: list[str], warn: Callable[[str], None]):
        self.store, self.spec, self.targeted, self.warn = store, spec, targeted, warn

    def __call__(self, progress: Progress, records: dict[str, list[dict]]) -> None:
        job = self.spec.name
        metrics = metrics_text(r for stage in sorted(records, key=int) for r in records[stage])
        summary = json.dumps(report_summary(self.spec, progress, self.targeted), indent=2)
        self.store.put(layout.report_key(job, "metrics.jsonl"), metrics.encode())
        self.store.put(layout.report_key(job, "summary.json"), summary.encode())
        try:
            png = self._curves(metrics, summary, progress)
        except Exception as err:  # a plot is a view of the run: it never fails a stage
            self.warn(f"report: curves.png not drawn after stage {progress.stage - 1}: {type(err).__name__}: {err}")
            return
        self.store.put(layout.report_key(job, "curves.png"), png)

    def _curves(self, metrics: str, summary: str, progress: Progress) -> bytes:
        from cropi.plotting import plot_run  # matplotlib: only where a report is drawn

        job = self.spec.name
        with tempfile.TemporaryDirectory(prefix="cropi-report-") as tmp:
            run_dir = Path(tmp)
            (run_dir / "metrics.jsonl").write_text(metrics)
            (run_dir / "summary.json").write_text(summary)
            (run_dir / "spec.yaml").write_text(self.spec.to_yaml())
            selections = LocalStore(run_dir / "store")
            for stage in range(min(progress.stage + 1, self.spec.curriculum.stages)):
                key = layout.selection_key(job, stage)
                if self.store.exists(key):
                    selections.put(key, self.store.get(key))
            return plot_run(run_dir).read_bytes()
