"""`executor: ray`: the task handlers of a job whose work runs on Ray.

The control plane does not change: the controller submits the same tasks on
the same Redis streams, a worker claims them and stores the same objects.
What changes is where the compute happens:

    offline  sampled by the rollout service (Ray Serve)
    project  fanned out to the gradient-projection pool (Ray actors)
    train    one Ray Train run per stage: DeepSpeed ZeRO-3 ranks train, the
             rollout service samples, weights flow trainer -> rollout each step

A worker process keeps one `RayExecutor` (one Ray session, one pool, one
rollout service per job) for all the ray jobs it serves.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from cropi.curriculum.workers import Cancelled, JobCache, Observer
from cropi.errors import InputError
from cropi.influence.engine import InfluenceEngine
from cropi.runtime.config import redis_url_of
from cropi.runtime.jobs import JobRegistry
from cropi.spec import JobSpec


def rollout_app_name(job: str) -> str:
    return f"cropi-rollout-{job}"


class RayExecutor:
    def __init__(self) -> None:
        self._connected = False
        self._address: str | None = None  # the Ray this executor joined (None: local)
        self._pools: dict[tuple, Any] = {}
        self._apps: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._started_ray = False  # shut Ray down on close only if this executor started it

    # ----------------------------------------------------------- components
    def connect(self, spec: JobSpec) -> None:
        from cropi.distributed.ray_runtime import init_ray

        if self._connected and self._address != spec.ray.address:
            raise InputError(f"ray.address: this worker is attached to Ray at {self._address or 'local'}; "
                             f"job {spec.name} asks for {spec.ray.address or 'local'} (run another worker)")
        import ray

        if not ray.is_initialized():
            init_ray(spec.ray.address, spec.ray.num_cpus)
            self._started_ray = True
        self._connected, self._address = True, spec.ray.address

    def rollout_handle(self, spec: JobSpec):
        """The job's rollout service (started on first use, at the job's base model)."""
        from cropi.distributed.rollout_serve import start_rollout_service

        self.connect(spec)
        app = rollout_app_name(spec.name)
        with self._lock:
            if app not in self._apps:
                self._apps[app] = start_rollout_service(spec, app)
            return self._apps[app]

    def pool(self, spec: JobSpec, store_url: str):
        from cropi.distributed.projection_pool import ProjectionPool

        self.connect(spec)
        key = (store_url, spec.ray.projector_actors, spec.ray.projector_gpus)
        with self._lock:
            if key not in self._pools:
                self._pools[key] = ProjectionPool(store_url, spec.ray.projector_actors,
                                                  gpus_per_actor=spec.ray.projector_gpus)
            return self._pools[key]

    def close(self) -> None:
        from cropi.distributed.rollout_serve import stop_rollout_service

        for pool in self._pools.values():
            pool.close()
        for app in self._apps:
            stop_rollout_service(app)
        self._pools.clear()
        self._apps.clear()
        if self._started_ray:
            from cropi.distributed.ray_runtime import shutdown_ray

            shutdown_ray()
            self._started_ray = False

    # ----------------------------------------------------------- handlers
    def offline(self, cache: JobCache, jobs: JobRegistry, payload: dict, heartbeat: Callable[[], None],
                observer: Observer | None = None) -> dict:
        from cropi.distributed.rollout_serve import ServeRolloutEngine

        job = payload["job"]
        spec = cache.spec(job)
        engine = ServeRolloutEngine(self.rollout_handle(spec))
        InfluenceEngine(spec, cache.store).collect_offline_part(engine, cache.data(job), payload["set"],
                                                                payload["part"])
        return {"set": payload["set"], "part": payload["part"]}

    def project(self, cache: JobCache, jobs: JobRegistry, payload: dict, heartbeat: Callable[[], None],
                observer: Observer | None = None) -> dict:
        from cropi.distributed.projection_pool import handle_project_on_pool

        spec = cache.spec(payload["job"])
        return handle_project_on_pool(self.pool(spec, cache.store.url), payload)

    def train(self, cache: JobCache, jobs: JobRegistry, payload: dict, heartbeat: Callable[[], None],
              observer: Observer | None = None) -> dict:
        from cropi.distributed.ray_stage import train_stage_on_ray

        spec = cache.spec(payload["job"])
        self.rollout_handle(spec)
        try:
            result = train_stage_on_ray(cache, jobs, payload, redis_url_of(jobs.r), rollout_app_name(spec.name),
                                        observer)
        except Exception:
            if jobs.cancel_requested(payload["job"]):
                raise Cancelled(payload["job"]) from None
            raise
        if result["stopped_early"] or result["stage"] == spec.curriculum.stages - 1:
            self.stop_rollout(spec.name)  # the job's last task: free the replicas' CPUs/GPUs
        return result

    def stop_rollout(self, job: str) -> None:
        from cropi.distributed.rollout_serve import stop_rollout_service

        app = rollout_app_name(job)
        with self._lock:
            self._apps.pop(app, None)
        stop_rollout_service(app)
