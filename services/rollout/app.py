"""Ray Serve entry point of the rollout service, for `serve run` and a RayService:

    serve run services.rollout.app:build_app model_path=/models/policy engine=vllm gpus=1

Arguments are strings (Serve passes `key=value` pairs through): the engine's
are the fields of `RolloutConfig`, the deployment's those of `RolloutAppArgs`.
This is a *standing* service: it outlives jobs and serves one at a time.
Its replicas follow the weight board named after the app; a job claims the
app there (`cropi.executors.ray.standing_rollout`) when its workers name it
(`ray.rollout_app` or CROPI_ROLLOUT_APP), and its trainer publishes there.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields

from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError
from ray import serve

from cropi.executors.ray.replica import RolloutConfig
from cropi.executors.ray.rollout_serve import (
    DEFAULT_BATCH_WAIT_S,
    DEFAULT_MAX_BATCH,
    DEFAULT_VERSION_WAIT_S,
    rollout_app,
)
from cropi.errors import InputError


class RolloutAppArgs(BaseModel):
    """The Serve-level arguments; the engine's (`RolloutConfig` fields) are checked by `RolloutConfig`."""

    model_config = ConfigDict(extra="forbid")

    replicas: int = 1
    cpus: float = 1
    gpus: float = 0
    max_batch_size: int = DEFAULT_MAX_BATCH
    batch_wait_timeout_s: float = DEFAULT_BATCH_WAIT_S
    version_wait_s: float = DEFAULT_VERSION_WAIT_S


def build_app(args: Mapping[str, str]) -> serve.Application:
    engine_keys = {f.name for f in fields(RolloutConfig)}
    try:
        # TypeAdapter turns `serve run`'s key=value strings into the dataclass's types.
        config = TypeAdapter(RolloutConfig).validate_python({k: v for k, v in args.items() if k in engine_keys})
        a = RolloutAppArgs.model_validate({k: v for k, v in args.items() if k not in engine_keys})
    except ValidationError as err:
        problems = "; ".join(
            (f"{'.'.join(map(str, e['loc']))}: " if e["loc"] else "") + e["msg"].removeprefix("Value error, ")
            for e in err.errors())
        raise InputError(f"rollout app arguments: {problems}") from None
    return rollout_app(config, replicas=a.replicas, cpus=a.cpus, gpus=a.gpus, max_batch_size=a.max_batch_size,
                       batch_wait_timeout_s=a.batch_wait_timeout_s, version_wait_s=a.version_wait_s)
