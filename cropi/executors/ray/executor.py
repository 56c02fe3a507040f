"""`executor: ray`: the task handlers of a job whose work runs on Ray.

The control plane does not change: the controller submits the same tasks on
the same Redis streams, a worker claims them and stores the same objects.
What changes is where the compute happens:

    offline  sampled by the rollout service (Ray Serve)
    project  fanned out to the gradient-projection pool (Ray actors)
    train    one Ray Train run per stage: DeepSpeed ZeRO-3 ranks train, the
             rollout service samples, weights flow trainer -> rollout each step

The rollout service is either the job's own Serve app (deployed on first
use, deleted after the last stage) or a standing app that jobs take turns on
(`standing_rollout`: the chart's RayService). A worker process keeps one
`RayExecutor` (one Ray session, one pool, the rollout services it started)
for all the ray jobs it serves.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from cropi.curriculum.influence import InfluenceEngine
from cropi.errors import InputError
from cropi.executors.inline import JobCache
from cropi.runtime.config import redis_url_of
from cropi.runtime.jobs import JobRegistry
from cropi.runtime.tasks import Cancelled, OfflineTask, ProjectTask, TaskContext, TrainTask
from cropi.spec import JobSpec


def rollout_app_name(job: str) -> str:
    """The per-job rollout app's name."""
    return f"cropi-rollout-{job}"


@dataclass(frozen=True)
class RolloutService:
    """The rollout app a job samples on, and how many replicas receive its trainer's weights."""

    app: str
    handle: Any
    replicas: int
    standing: bool


class RayExecutor:
    def __init__(self, cache: JobCache) -> None:
        self.cache = cache
        self._connected = False
        self._address: str | None = None  # the Ray this executor joined (None: local)
        self._pools: dict[tuple, Any] = {}
        self._apps: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._started_ray = False  # shut Ray down on close only if this executor started it

    # ----------------------------------------------------------- components
    def connect(self, spec: JobSpec) -> None:
        from cropi.executors.ray.cluster import init_ray

        if self._connected and self._address != spec.ray.address:
            raise InputError(f"ray.address: this worker is attached to Ray at {self._address or 'local'}; "
                             f"job {spec.name} asks for {spec.ray.address or 'local'} (run another worker)")
        import ray

        if not ray.is_initialized():
            init_ray(spec.ray.address, spec.ray.num_cpus)
            self._started_ray = True
        self._connected, self._address = True, spec.ray.address

    def rollout(self, spec: JobSpec, jobs: JobRegistry) -> RolloutService:
        """The job's rollout service, holding the job's weights (base weights until its trainer publishes)."""
        from cropi.executors.ray import standing_rollout
        from cropi.executors.ray.rollout_serve import start_rollout_service

        self.connect(spec)
        standing = standing_rollout.standing_app_name(spec)
        if standing is None:
            app = rollout_app_name(spec.name)
            with self._lock:
                if app not in self._apps:
                    self._apps[app] = start_rollout_service(spec, app)
                return RolloutService(app, self._apps[app], spec.ray.rollout_replicas, standing=False)
        handle = standing_rollout.standing_handle(standing, self._address)
        described = handle.describe.remote().result()
        standing_rollout.check_serves(described, spec, standing)
        standing_rollout.claim(standing, spec.name, jobs)
        return RolloutService(standing, handle, described["replicas"], standing=True)

    def pool(self, spec: JobSpec, store_url: str):
        from cropi.executors.ray.projection_pool import ProjectionPool

        self.connect(spec)
        key = (store_url, spec.ray.projector_actors, spec.ray.projector_gpus)
        with self._lock:
            if key not in self._pools:
                self._pools[key] = ProjectionPool(store_url, spec.ray.projector_actors,
                                                  gpus_per_actor=spec.ray.projector_gpus)
            return self._pools[key]

    def close(self) -> None:
        from cropi.executors.ray.rollout_serve import stop_rollout_service

        for pool in self._pools.values():
            pool.close()
        for app in self._apps:
            stop_rollout_service(app)
        self._pools.clear()
        self._apps.clear()
        if self._started_ray:
            from cropi.executors.ray.cluster import shutdown_ray

            shutdown_ray()
            self._started_ray = False

    # ----------------------------------------------------------- handlers
    def offline(self, task: OfflineTask, ctx: TaskContext) -> dict:
        from cropi.executors.ray.rollout_serve import ServeRolloutEngine

        spec = self.cache.spec(task.job)
        engine = ServeRolloutEngine(self.rollout(spec, ctx.jobs).handle, owner=task.job)
        InfluenceEngine(spec, self.cache.store).collect_offline_part(engine, self.cache.data(task.job), task.set,
                                                                     task.part)
        return {"set": task.set, "part": task.part}

    def project(self, task: ProjectTask, ctx: TaskContext) -> dict:
        spec = self.cache.spec(task.job)
        self.pool(spec, self.cache.store.url).project_parts(task.job, task.stage, [(task.set, task.part)])
        return {"stage": task.stage, "set": task.set, "part": task.part}

    def train(self, task: TrainTask, ctx: TaskContext) -> dict:
        from cropi.executors.ray.stage import train_stage_on_ray

        spec = self.cache.spec(task.job)
        service = self.rollout(spec, ctx.jobs)
        try:
            result = train_stage_on_ray(self.cache, ctx, task, redis_url_of(ctx.jobs.r), service.app,
                                        service.replicas)
        except Exception:
            if ctx.jobs.cancel_requested(task.job):
                raise Cancelled(task.job) from None
            raise
        if result["stopped_early"] or result["stage"] == spec.curriculum.stages - 1:
            self.end_rollout(spec.name, service)  # the job's last task
        return result

    def end_rollout(self, job: str, service: RolloutService) -> None:
        """The job is done sampling: free its own app's CPUs/GPUs, or hand the standing app on."""
        from cropi.executors.ray import standing_rollout
        from cropi.executors.ray.rollout_serve import stop_rollout_service

        if service.standing:
            standing_rollout.release(service.app, job)
            return
        with self._lock:
            self._apps.pop(service.app, None)
        stop_rollout_service(service.app)
