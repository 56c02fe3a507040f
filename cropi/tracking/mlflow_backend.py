"""MLflow (the `tracking` extra), through `MlflowClient` (no global active
run, so that one process can track several jobs). Credentials come from the
environment (MLFLOW_TRACKING_TOKEN, MLFLOW_TRACKING_USERNAME / _PASSWORD).

The run is found again by its tag `cropi.run` (the run key): a resumed run,
or the next stage on another trainer, continues it.
"""

from __future__ import annotations

import os
import re
import time
from typing import Any

from cropi.errors import InputError
from cropi.spec import JobSpec
from cropi.tracking.names import EXTRA, flat_config, scalars

RUN_TAG = "cropi.run"
MAX_PARAMS = 100  # MLflow takes at most 100 params per batch


def _key(name: str) -> str:
    """MLflow's metric names allow letters, digits, '_', '-', '.', ' ', '/' (a data source's name may hold more)."""
    return re.sub(r"[^A-Za-z0-9_\-. /]", "_", name)


class MlflowTracker:
    def __init__(self, spec: JobSpec, key: str):
        try:
            from mlflow.entities import Metric, Param
            from mlflow.exceptions import MlflowException
            from mlflow.tracking import MlflowClient
        except ImportError as err:
            raise InputError(f"tracking.backends lists mlflow, but it cannot be imported ({err}); {EXTRA}") from None
        cfg = spec.tracking.mlflow
        try:
            self._client = MlflowClient(tracking_uri=cfg.tracking_uri)  # None: MLFLOW_TRACKING_URI, else the default
            name = cfg.experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or spec.name
            experiment = self._client.get_experiment_by_name(name)
            experiment_id = experiment.experiment_id if experiment else self._client.create_experiment(name)
            found = self._client.search_runs([experiment_id], filter_string=f"tags.`{RUN_TAG}` = '{key}'",
                                             max_results=1)
            if found:
                self.run_id = found[0].info.run_id
                self._client.update_run(self.run_id, status="RUNNING")
            else:
                run = self._client.create_run(experiment_id, run_name=cfg.run_name or spec.name,
                                              tags={RUN_TAG: key, "cropi.job": spec.name})
                self.run_id = run.info.run_id
                params = [Param(k, v) for k, v in flat_config(spec.model_dump(mode="json")).items()]
                for i in range(0, len(params), MAX_PARAMS):
                    self._client.log_batch(self.run_id, params=params[i:i + MAX_PARAMS])
        except MlflowException as err:
            raise InputError(f"tracking: MLflow refused to start the run: {err}") from None
        self._metric = Metric

    def log(self, kind: str, step: int, values: dict[str, Any]) -> None:
        now = int(time.time() * 1000)
        metrics = [self._metric(_key(name), value, now, step) for name, value in scalars(kind, values).items()]
        if metrics:
            self._client.log_batch(self.run_id, metrics=metrics)

    def log_stage(self, stage: int, step: int, stats: dict[str, Any]) -> None:
        self.log("selection", step, {"stage": stage, **stats})

    def close(self) -> None:
        self._client.set_terminated(self.run_id)
