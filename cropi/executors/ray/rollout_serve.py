"""The rollout service on Ray Serve: replicas of a rollout engine (HF on CPU,
vLLM on GPU) behind one deployment handle.

    generate(prompts, n, sampling, min_version=0, owner=None)   batched with @serve.batch
    logprobs(prompt_ids, response_ids, temperature)              teacher-forced, current weights
    load_weights(named_tensors, version), load_weights_from_store(url, prefix, version)
    version(), describe(), stats()

Batching. Concurrent `generate` calls on a replica are grouped and handed to
the engine together. A request's trajectories must not depend on its
neighbours (the job's selections must equal the inline executor's), so:
with vLLM the group goes into one `LLM.generate` call, where continuous
batching interleaves the sequences while each keeps its own seed; with the
HF engine the requests of a group still run one after another, each with its
own seeded generator, padding and chunking, exactly as
`HFRolloutEngine.generate` of that request alone. On CPU, batching then only
saves the dispatch between requests; the forward passes stay per request.

Weights. A replica starts at version 0 (the weights of `model_path`). A
trainer moves it on through the weight board (`weight_channel`: broadcast
or object-store path; each replica follows the board named after its app)
or, for a single replica, by calling `load_weights*` on the handle: a handle
call reaches *one* replica, so a service of several replicas takes its
weights through the board. `generate(..., min_version=v, owner=J)` waits
(bounded) until the replica holds a complete version >= v of job J's
weights; weights are never written while the replica samples.

Two ways to run it: a per-job app `cropi-rollout-<job>` that the Ray
executor deploys and deletes (`start_rollout_service`), or a standing app
that outlives jobs (a RayService's `services.rollout.app:build_app`) and
serves one job at a time (`standing_rollout.claim`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from typing import Any

import torch
from ray import serve

from cropi.executors.ray.replica import Request, RolloutConfig, build_replica
from cropi.errors import InputError
from cropi.rollout.base import SamplingParams, Trajectory
from cropi.spec import JobSpec

log = logging.getLogger(__name__)

DEFAULT_MAX_BATCH = 8
DEFAULT_BATCH_WAIT_S = 0.01
DEFAULT_VERSION_WAIT_S = 600.0
_POLL_S = 0.02


class RolloutServiceError(RuntimeError):
    """The rollout service could not be started."""


# A replica that cannot start is a configuration error (model path, missing vLLM, memory): fail the deploy
# at once instead of retrying the constructor (Serve still replaces replicas that die later).
@serve.deployment(max_ongoing_requests=64, max_constructor_retry_count=1)
class RolloutServer:
    def __init__(self, config: dict, max_batch_size: int = DEFAULT_MAX_BATCH,
                 batch_wait_timeout_s: float = DEFAULT_BATCH_WAIT_S,
                 version_wait_s: float = DEFAULT_VERSION_WAIT_S, follow_board: bool = True,
                 owner: str | None = None, replicas: int = 1):
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        self.config = config
        self.replicas = replicas
        self.replica = build_replica(RolloutConfig(**config), owner)
        self.version_wait_s = version_wait_s
        self._generate_batch.set_max_batch_size(max_batch_size)
        self._generate_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self._batch_sizes: deque[int] = deque(maxlen=1000)
        self._stop = threading.Event()
        if follow_board:
            board = serve.get_replica_context().app_name
            threading.Thread(target=self._follow_board, args=(board,), daemon=True, name="weight-board").start()

    # ----------------------------------------------------------- sampling
    async def generate(self, prompts: Sequence[str], n: int, sampling: SamplingParams,
                       min_version: int = 0, owner: str | None = None) -> list[list[Trajectory]]:
        """`n` responses per prompt, as `HFRolloutEngine.generate` / `VLLMRolloutEngine.generate` return them."""
        _check_request(prompts, n, sampling)
        await self._until_version(min_version, owner)
        return await self._generate_batch((list(prompts), n, sampling))

    @serve.batch(max_batch_size=DEFAULT_MAX_BATCH, batch_wait_timeout_s=DEFAULT_BATCH_WAIT_S)
    async def _generate_batch(self, requests: list[Request]) -> list[list[list[Trajectory]]]:
        self._batch_sizes.append(len(requests))
        # A worker thread: the event loop keeps queueing the next batch and answering version() meanwhile.
        return await asyncio.to_thread(self.replica.generate_many, requests, self.version_wait_s)

    async def logprobs(self, prompt_ids: Sequence[int], response_ids: Sequence[int], temperature: float = 1.0,
                       min_version: int = 0, owner: str | None = None) -> list[float]:
        """log softmax(logits / temperature) of each response token, teacher-forced."""
        await self._until_version(min_version, owner)
        return await asyncio.to_thread(self.replica.logprobs, list(prompt_ids), list(response_ids), temperature,
                                       self.version_wait_s)

    # ----------------------------------------------------------- weights
    async def load_weights(self, named_tensors: Mapping[str, torch.Tensor] | Sequence[tuple[str, torch.Tensor]],
                           version: int, owner: str | None = None) -> int:
        """Apply a state dict or (name, tensor) pairs as weights `version`; returns how many tensors."""
        named = list(named_tensors.items()) if isinstance(named_tensors, Mapping) else list(named_tensors)
        return await asyncio.to_thread(self.replica.load_weights, named, version, owner)

    async def load_weights_from_store(self, store_url: str, prefix: str, version: int,
                                      owner: str | None = None) -> int:
        """Load the HF folder stored under `prefix` (see `workers.put_checkpoint`) as weights `version`."""
        return await asyncio.to_thread(self.replica.load_weights_from_store, store_url, prefix, version, owner)

    def version(self) -> int:
        return self.replica.version

    def describe(self) -> dict[str, Any]:
        """What the service serves: the engine's `RolloutConfig` fields and the number of replicas."""
        return {**self.config, "replicas": self.replicas}

    def stats(self) -> dict[str, Any]:
        """The weights (owner, version) and the sizes of the last (up to 1000) generate batches."""
        return {"version": self.replica.version, "owner": self.replica.owner, "batch_sizes": list(self._batch_sizes)}

    # ----------------------------------------------------------- internals
    async def _until_version(self, min_version: int, owner: str | None) -> None:
        """Wait (bounded) for owner's version >= min_version; the batch thread then waits out a half-applied one."""
        deadline = time.monotonic() + self.version_wait_s
        while not self.replica.holds(owner, min_version):
            if time.monotonic() > deadline:
                whose = f" of job {owner}" if owner else ""
                raise TimeoutError(
                    f"rollout replica holds weights version {self.replica.version} of "
                    f"{self.replica.owner or 'no job'}; the request needs >= {min_version}{whose} and none "
                    f"arrived within {self.version_wait_s:.0f}s (is a trainer publishing weights to this service?)")
            await asyncio.sleep(_POLL_S)

    def _follow_board(self, app_name: str) -> None:
        from cropi.executors.ray.weight_channel import follow_board, get_or_create_board

        try:
            follow_board(get_or_create_board(app_name), self.replica, self._stop)
        except Exception:  # the replica keeps serving its current weights; the log says why they stopped
            log.exception("rollout replica stopped following the weight board of %s", app_name)

    def __del__(self) -> None:
        self._stop.set()


def _check_request(prompts: Sequence[str], n: int, sampling: SamplingParams) -> None:
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise InputError("generate: prompts must be a list of strings")
    if not isinstance(n, int) or n < 1:
        raise InputError(f"generate: n must be a positive integer, not {n!r}")
    if not isinstance(sampling, SamplingParams):
        raise InputError(f"generate: sampling must be cropi.rollout.SamplingParams, not {type(sampling).__name__}")


# ---------------------------------------------------------------------------
# Building, starting and stopping the service.


def rollout_app(config: RolloutConfig, *, replicas: int = 1, cpus: float = 1, gpus: float = 0,
                max_batch_size: int = DEFAULT_MAX_BATCH, batch_wait_timeout_s: float = DEFAULT_BATCH_WAIT_S,
                version_wait_s: float = DEFAULT_VERSION_WAIT_S, follow_board: bool = True,
                owner: str | None = None) -> serve.Application:
    """The Serve application of a rollout service (`owner`: the job its base weights belong to, if any)."""
    from cropi.executors.ray.cluster import actor_env, forwarded_env

    threads = max(1, int(cpus))
    actor: dict[str, Any] = {"num_cpus": cpus, "num_gpus": gpus,
                             "runtime_env": {"env_vars": {**actor_env(threads), **forwarded_env()}}}
    options: dict[str, Any] = {"num_replicas": replicas, "ray_actor_options": actor}
    if config.engine == "vllm":
        if config.tensor_parallel > 1:
            # vLLM's Ray executor starts one worker per GPU in the replica's placement group.
            actor["num_gpus"] = 0
            options["placement_group_bundles"] = [{"CPU": cpus}] + [{"GPU": 1}] * config.tensor_parallel
            options["placement_group_strategy"] = "STRICT_PACK"
        else:
            actor["num_gpus"] = gpus or 1
    return RolloutServer.options(**options).bind(asdict(config), max_batch_size, batch_wait_timeout_s,
                                                 version_wait_s, follow_board, owner, replicas)


def start_rollout_service(spec: JobSpec, app_name: str, *, max_batch_size: int = DEFAULT_MAX_BATCH, batch_wait_timeout_s: float = DEFAULT_BATCH_WAIT_S,
                          version_wait_s: float = DEFAULT_VERSION_WAIT_S,
                          follow_board: bool = True) -> serve.handle.DeploymentHandle:
    """The job's rollout service as Serve app `app_name` (started unless it is already running).

    Serve runs without its HTTP proxy: callers use the handle. Replicas hold
    the job's weights and follow the weight board of `app_name` unless
    `follow_board` is false.
    """
    from cropi.executors.ray.cluster import init_ray

    config = RolloutConfig.from_spec(spec)  # bad settings fail here, before anything starts
    init_ray(spec.ray.address, spec.ray.num_cpus)
    if app_status(app_name) in ("RUNNING", "DEPLOYING"):  # another caller started it: redeploying would
        return serve.get_app_handle(app_name)                 # restart its replicas at the base weights
    serve.start(proxy_location="Disabled")
    app = rollout_app(config, replicas=spec.ray.rollout_replicas, cpus=1, gpus=spec.ray.rollout_gpus,
                      max_batch_size=max_batch_size, batch_wait_timeout_s=batch_wait_timeout_s,
                      version_wait_s=version_wait_s, follow_board=follow_board, owner=spec.name)
    return run_app(app, app_name)


def run_app(app: serve.Application, app_name: str) -> serve.handle.DeploymentHandle:
    """Deploy `app`; a replica that cannot start is reported with its own error (InputError for bad input)."""
    try:
        return serve.run(app, name=app_name, route_prefix=None)
    except RuntimeError:
        cause = _failure(app_name)
        serve.delete(app_name)
        if cause.startswith("cropi.errors.InputError: "):
            raise InputError(cause.removeprefix("cropi.errors.InputError: ")) from None
        raise RolloutServiceError(f"rollout service {app_name} failed to start: {cause}") from None


def stop_rollout_service(app_name: str) -> None:
    """Delete the Serve app and its weight board (a later service starts from the base weights)."""
    import ray

    from cropi.executors.ray.weight_channel import BOARD_NAMESPACE, board_name

    if app_status(app_name) is not None:
        serve.delete(app_name)
    try:
        ray.kill(ray.get_actor(board_name(app_name), namespace=BOARD_NAMESPACE))
    except ValueError:  # no board: nobody followed or announced
        pass


class ServeRolloutEngine:
    """The `RolloutEngine` interface over a rollout service handle (blocking calls).

    `min_version_fn` gives the weights version each call needs (e.g. the
    trainer's last published step) and `owner` the job they must belong to,
    so samples never come from older weights or from another job's.
    """

    def __init__(self, handle: serve.handle.DeploymentHandle, min_version_fn: Callable[[], int] | None = None,
                 owner: str | None = None):
        self.handle = handle
        self.min_version_fn = min_version_fn
        self.owner = owner

    def generate(self, prompts: Sequence[str], n: int, sampling: SamplingParams) -> list[list[Trajectory]]:
        min_version = self.min_version_fn() if self.min_version_fn else 0
        return self.handle.generate.remote(list(prompts), n, sampling, min_version, self.owner).result()


def app_status(app_name: str) -> str | None:
    """The Serve app's status (RUNNING, DEPLOYING, ...), None when there is no such app."""
    app = serve.status().applications.get(app_name)  # no applications (not an error) when Serve is not running
    return None if app is None else str(app.status.value)


def _failure(app_name: str) -> str:
    """The last line of the error that kept the app's replicas from starting."""
    app = serve.status().applications.get(app_name)
    messages = [d.message for d in app.deployments.values() if d.message] if app else []
    lines = [line.strip() for m in messages for line in m.splitlines() if line.strip()]
    return lines[-1] if lines else "no error reported (see the Serve controller log)"
