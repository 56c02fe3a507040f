"""Ray Serve entry point of the rollout service, for `serve run` and a RayService:

    serve run services.rollout.app:build_app model_path=/models/policy engine=vllm gpus=1 board=cropi-rollout-myjob

Arguments are strings (Serve passes `key=value` pairs through); the fields of
`RolloutAppArgs` name them. `board` is the app whose weight board the
replicas follow: the trainer of job J publishes to `cropi-rollout-J`.
"""

from __future__ import annotations

from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict, ValidationError
from ray import serve

from cropi.distributed.rollout_replica import RolloutConfig
from cropi.distributed.rollout_serve import (
    DEFAULT_BATCH_WAIT_S,
    DEFAULT_MAX_BATCH,
    DEFAULT_VERSION_WAIT_S,
    rollout_app,
)
from cropi.errors import InputError


class RolloutAppArgs(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model_path: str
    dtype: str = "float32"
    engine: str = "hf"
    batch_size: int = 256
    tensor_parallel: int = 1
    gpu_memory_utilization: float = 0.5
    seed: int = 0
    replicas: int = 1
    cpus: float = 1
    gpus: float = 0
    max_batch_size: int = DEFAULT_MAX_BATCH
    batch_wait_timeout_s: float = DEFAULT_BATCH_WAIT_S
    version_wait_s: float = DEFAULT_VERSION_WAIT_S
    board: str | None = None


def build_app(args: Mapping[str, str]) -> serve.Application:
    try:
        a = RolloutAppArgs.model_validate(dict(args))
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        raise InputError(f"rollout app arguments: {problems}") from None
    config = RolloutConfig(model_path=a.model_path, dtype=a.dtype, engine=a.engine, batch_size=a.batch_size,
                           tensor_parallel=a.tensor_parallel, gpu_memory_utilization=a.gpu_memory_utilization,
                           seed=a.seed)
    return rollout_app(config, replicas=a.replicas, cpus=a.cpus, gpus=a.gpus, max_batch_size=a.max_batch_size,
                       batch_wait_timeout_s=a.batch_wait_timeout_s, version_wait_s=a.version_wait_s,
                       board=a.board or None)
