"""The tracker interface and what the backends share.

    log(kind, step, values)        one metric record (its numbers become scalars)
    log_stage(stage, step, stats)  a stage's selection statistics (selected, eligible, mix, seconds)
    close()                        flush and finish

Scalar names are made by `names.scalars`.

`open_trackers` builds the backends a spec's `tracking.backends` lists;
W&B and MLflow are imported when opened, and `check_backends` refuses a
spec whose client is not installed (the `tracking` extra), before a run
starts.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
from pathlib import Path
from typing import Any, Protocol

from cropi.errors import InputError
from cropi.spec import JobSpec
from cropi.tracking.names import EXTRA

log = logging.getLogger(__name__)

CLIENTS = {"wandb": "wandb", "mlflow": "mlflow"}  # backend -> the module it needs


class Tracker(Protocol):
    def log(self, kind: str, step: int, values: dict[str, Any]) -> None: ...

    def log_stage(self, stage: int, step: int, stats: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def run_key(job: str, created: Any) -> str:
    """A stable id of one run of a job (its name and when it was submitted): a resumed run, or the
    next stage on another worker, continues the same W&B / MLflow run; a resubmitted job starts another."""
    return hashlib.sha256(f"{job}|{created}".encode()).hexdigest()[:16]


def check_backends(spec: JobSpec) -> None:
    """InputError naming the extra when a listed backend's client is not installed here."""
    for backend in spec.tracking.backends:
        module = CLIENTS.get(backend)
        if module and importlib.util.find_spec(module) is None:
            raise InputError(f"tracking.backends lists {backend}, but the {module!r} package is not installed; "
                             f"install it with: {EXTRA}")


def open_trackers(spec: JobSpec, key: str, tb_dir: Path | None, files_dir: Path | None,
                  purge_step: int | None = None) -> list[Tracker]:
    """The trackers of `spec.tracking.backends`. `tb_dir`: TensorBoard's folder (None: no TensorBoard
    here); `files_dir`: where W&B keeps its run files (None: WANDB_DIR or W&B's default);
    `purge_step`: TensorBoard hides earlier events from this step on (a resumed run's)."""
    check_backends(spec)
    trackers: list[Tracker] = []
    try:
        for backend in spec.tracking.backends:
            if backend == "tensorboard":
                if tb_dir is None:
                    log.info("job %s: no TensorBoard folder here (CROPI_TENSORBOARD_DIR unset); skipped", spec.name)
                    continue
                from cropi.tracking.tensorboard import TensorBoardTracker

                trackers.append(TensorBoardTracker(tb_dir, purge_step))
            elif backend == "wandb":
                from cropi.tracking.wandb_backend import WandbTracker

                trackers.append(WandbTracker(spec, key, files_dir))
            elif backend == "mlflow":
                from cropi.tracking.mlflow_backend import MlflowTracker

                trackers.append(MlflowTracker(spec, key))
    except BaseException:
        close_all(trackers)
        raise
    return trackers


def close_all(trackers: list[Tracker]) -> None:
    for tracker in trackers:
        try:
            tracker.close()
        except Exception:  # one backend's failure to finish must not hide the others' or the run's
            log.exception("closing tracker %s failed", type(tracker).__name__)
