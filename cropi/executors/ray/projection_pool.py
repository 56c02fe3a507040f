"""The gradient-projection pool: a stage's `project` parts fanned out to Ray actors.

Each actor keeps one stage loaded (the stage-start policy, the job's offline
trajectories and the POPI hooks), so a stage costs one model load per actor,
not one per part. It runs the inline handler's code (`InfluenceEngine.project_part`,
which skips stored parts), so a part's bytes do not depend on where it ran.

Scheduling is dynamic: an actor holds at most one part, and the next part goes
to whichever actor is idle first. An actor that dies (its process or its node)
is replaced and its part runs again on the replacement; a part that has lost
`max_attempts` actors is reported instead of retried forever (a part that
exhausts memory each time would otherwise eat the cluster's actors one by one).
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Self

import ray
import torch
from ray.exceptions import RayActorError

from cropi.executors.ray.cluster import actor_env, forwarded_env, init_ray
from cropi.curriculum.influence import InfluenceEngine
from cropi.executors.inline import JobCache
from cropi.influence.popi import POPIProjector
from cropi.runtime.config import open_store

Part = tuple[str, int]  # (set name, part index), as `InfluenceEngine.stage_parts` lists them
OnDone = Callable[[Part, dict], None]


class PoolError(RuntimeError):
    """A part could not be projected: every actor it was given to died."""


class ProjectorActor:
    """One pool member (a Ray actor): projects the parts of one (job, stage) at a time."""

    def __init__(self, store_url: str, threads: int):
        torch.set_num_threads(threads)
        self.cache = JobCache(open_store(store_url))
        self._loaded: tuple[str, int, InfluenceEngine, POPIProjector] | None = None

    def prepare(self, job: str, stage: int) -> float:
        """Load `stage` now rather than with its first part; returns the seconds it took."""
        t0 = time.perf_counter()
        engine, _ = self._stage(job, stage)
        engine.projector.project_flat([("warm-up", torch.zeros(1))])  # loads the compiled kernel
        return time.perf_counter() - t0

    def project(self, job: str, stage: int, set_name: str, part: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        engine, popi = self._stage(job, stage)
        t1 = time.perf_counter()
        engine.project_part(stage, set_name, part, popi)
        return {"stage": stage, "set": set_name, "part": part, "load_s": t1 - t0,
                "project_s": time.perf_counter() - t1, "actor": ray.get_runtime_context().get_actor_id()}

    def _stage(self, job: str, stage: int) -> tuple[InfluenceEngine, POPIProjector]:
        if self._loaded is None or self._loaded[:2] != (job, stage):
            if self._loaded is not None:
                self._loaded[3].close()
                self._loaded = None
            policy = self.cache.stage_policy(job, stage)
            if ray.get_gpu_ids():  # Ray gave this actor a GPU (CUDA may be visible without one)
                policy.model.to("cuda")
            engine = InfluenceEngine(self.cache.spec(job), self.cache.store, policy.model, policy.tokenizer)
            if engine.needs_behaviour_model(stage):
                engine.behaviour = policy.base_model().to(policy.model.device)
            engine.load_offline(self.cache.data(job))
            self._loaded = (job, stage, engine, engine.popi())
        return self._loaded[2], self._loaded[3]


class ProjectionPool:
    """`actors` projector actors on Ray, reading and writing the store at `store_url`.

    Each actor reserves `cpus_per_actor` logical CPUs and `gpus_per_actor` GPUs
    and computes with `threads_per_actor` threads; a part is given to at most
    `max_attempts` actors. `project_parts` may be called from several threads at once.
    """

    def __init__(self, store_url: str, actors: int, threads_per_actor: int = 1, gpus_per_actor: float = 0,
                 cpus_per_actor: float = 1, max_attempts: int = 3):
        if actors < 1 or max_attempts < 1:
            raise ValueError("a pool needs at least one actor and one attempt per part")
        init_ray()
        env = {**actor_env(threads_per_actor), **forwarded_env()}
        self._actor_class = ray.remote(ProjectorActor).options(
            num_cpus=cpus_per_actor, num_gpus=gpus_per_actor, max_restarts=0,  # the pool replaces, not Ray
            runtime_env={"env_vars": env})
        self._store_url, self._threads = store_url, threads_per_actor
        self.max_attempts = max_attempts
        self.replaced = 0  # actors found dead and replaced
        self._lock = threading.Lock()
        self._idle: queue.Queue = queue.Queue()
        self._closed = False
        self.actors: list[Any] = [self._spawn() for _ in range(actors)]
        for actor in self.actors:
            self._idle.put(actor)

    def prepare(self, job: str, stage: int) -> None:
        """Load `stage` on every actor now, e.g. to time the parts without the start-up."""
        with self._lock:
            actors = list(self.actors)
        ray.get([a.prepare.remote(job, stage) for a in actors])

    def project_parts(self, job: str, stage: int, parts: list[Part], on_done: OnDone | None = None) -> dict:
        """Project and store `parts` of `stage`; `on_done(part, result)` as each one finishes.

        Returns {"parts", "retried", "seconds"}. Raises `PoolError` naming a part
        whose actors all died, and an actor's own error as Ray re-raises it.
        """
        t0 = time.perf_counter()
        pending: deque[Part] = deque((set_name, int(index)) for set_name, index in parts)
        attempts: dict[Part, int] = {}
        in_flight: dict[ray.ObjectRef, tuple[Any, Part]] = {}
        retried = 0
        try:
            while pending or in_flight:
                while pending:
                    actor = self._checkout(wait=not in_flight)
                    if actor is None:
                        break
                    part = pending.popleft()
                    attempts[part] = attempts.get(part, 0) + 1
                    in_flight[actor.project.remote(job, stage, *part)] = (actor, part)
                [ready], _ = ray.wait(list(in_flight), num_returns=1)
                actor, part = in_flight.pop(ready)
                try:
                    result = ray.get(ready)
                except RayActorError as err:
                    self._replace(actor)
                    if attempts[part] >= self.max_attempts:
                        raise PoolError(f"part {part[0]}/{part[1]} of job {job} stage {stage}: "
                                        f"{attempts[part]} actors died projecting it; last: {err}") from err
                    retried += 1
                    pending.appendleft(part)
                    continue
                except Exception:
                    self._idle.put(actor)  # the part failed, not the actor
                    raise
                self._idle.put(actor)
                if on_done is not None:
                    on_done(part, result)
        finally:
            # Back to the pool as they are: an actor runs its calls in order, so one still busy
            # with a part of this call only delays the next caller's part.
            for actor, _ in in_flight.values():
                self._idle.put(actor)
        return {"parts": len(parts), "retried": retried, "seconds": time.perf_counter() - t0}

    def close(self) -> None:
        with self._lock:
            self._closed = True
            actors, self.actors = self.actors, []
        for actor in actors:
            ray.kill(actor, no_restart=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------- actors
    def _spawn(self) -> Any:
        return self._actor_class.remote(self._store_url, self._threads)

    def _checkout(self, wait: bool) -> Any | None:
        """An idle actor; None at once if none is idle and `wait` is false."""
        while True:
            if self._closed:
                raise RuntimeError("the projection pool is closed")
            try:
                return self._idle.get(timeout=0.5) if wait else self._idle.get_nowait()
            except queue.Empty:
                if not wait:
                    return None

    def _replace(self, dead: Any) -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError("the projection pool is closed")
            fresh = self._spawn()
            self.actors[self.actors.index(dead)] = fresh
            self.replaced += 1
        ray.kill(dead, no_restart=True)  # a half-dead actor (e.g. unreachable node) frees its resources
        self._idle.put(fresh)
