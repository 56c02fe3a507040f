"""A standing rollout service shared by jobs, one job at a time.

On Kubernetes the rollout service is a RayService's Serve app that outlives
jobs (vLLM replicas take minutes to start and hold their GPUs). A worker
whose job names such an app (`ray.rollout_app`, else `CROPI_ROLLOUT_APP`)
does not deploy one of its own; it

1. checks that the app serves what the job asks for (model, dtype, engine;
   for the HF engine the generation chunk, which shapes the samples), else
   the job fails with the fields that differ;
2. claims the app on its weight board: the replicas go back to the base
   weights, as version 0 of this job, before the job samples anything. While
   another job that is still running holds the app, the task is deferred
   (back to the queue, no attempt spent); a holder that has ended, failed or
   is unknown to this controller is taken over;
3. releases it when the job's last stage is trained.

Replicas answer a job's requests only with that job's weights (see
`RolloutReplica.holds`), so a job can never sample from its predecessor's.
"""

from __future__ import annotations

import os
from typing import Any

from cropi.errors import InputError
from cropi.runtime.jobs import TERMINAL, JobRegistry
from cropi.spec import JobSpec

ENV_APP = "CROPI_ROLLOUT_APP"
_WAIT_S = 2.0


def standing_app_name(spec: JobSpec) -> str | None:
    """The standing rollout app the job samples on, or None for a per-job app."""
    return spec.ray.rollout_app or os.environ.get(ENV_APP) or None


def check_serves(described: dict[str, Any], spec: JobSpec, app: str) -> None:
    """Refuse a job whose rollouts the app would sample from another model or differently."""
    from cropi.executors.ray.replica import RolloutConfig

    want = RolloutConfig.from_spec(spec)
    fields = [("model.path", "model_path"), ("rollout.engine", "engine")]
    if want.dtype != "auto":  # auto: whatever the app's devices run best
        fields.append(("model.dtype", "dtype"))
    if want.engine == "hf":
        fields.append(("rollout.batch_size", "batch_size"))
    diffs = [f"{field} is {getattr(want, key)!r}, the app serves {described.get(key)!r}"
             for field, key in fields if described.get(key) != getattr(want, key)]
    if diffs:
        raise InputError(f"ray.rollout_app: the standing rollout app {app} cannot serve job {spec.name}: "
                         + "; ".join(diffs))


def standing_handle(app: str, address: str | None):
    """The running app's handle; a clear error when no such app runs on this Ray cluster."""
    from ray import serve

    from cropi.executors.ray.rollout_serve import app_status

    state = app_status(app)
    if state not in ("RUNNING", "DEPLOYING"):
        state = state or "not deployed"
        raise InputError(f"ray.rollout_app: no running Serve app named {app} on the Ray cluster at "
                         f"{address or 'local'} ({state}); deploy it (the chart's RayService does) or "
                         f"unset ray.rollout_app and {ENV_APP} to let the job start its own")
    return serve.get_app_handle(app)


def _running(jobs: JobRegistry, job: str) -> bool:
    rec = jobs.get(job)
    return rec is not None and rec.get("phase") not in TERMINAL


def claim(app: str, job: str, jobs: JobRegistry) -> None:
    """Make `job` the app's owner; `Deferred` while another running job holds it."""
    import ray

    from cropi.runtime.tasks import Deferred
    from cropi.executors.ray.weight_channel import get_or_create_board

    board = get_or_create_board(app)
    while True:
        owner = ray.get(board.owner.remote())
        if owner == job:
            return
        if owner is not None and _running(jobs, owner):
            # Waiting here would block this worker's other tasks (those of the holder among them).
            raise Deferred(f"rollout app {app} is serving job {owner}; this job waits for it to end")
        if ray.get(board.claim.remote(job, owner)):
            jobs.event(job, "rollout_claimed", f"rollout app {app}: serving job {job} from the base weights"
                       + (f" (after {owner})" if owner else ""))
            return
        # another job claimed it meanwhile: look again


def release(app: str, job: str) -> None:
    """The job is done with the app (a no-op if it no longer holds it)."""
    import ray

    from cropi.executors.ray.weight_channel import get_or_create_board

    ray.get(get_or_create_board(app).release.remote(job))
