"""What one rollout replica runs, whoever serves it: a rollout engine (hf | vllm)
whose weights carry a version number.

Weights change under the replica while it serves: whole versions (a direct
call, the object-store path) or bucket by bucket (the broadcast path, where
a replica never holds two copies of a large model). One condition variable
orders the two: sampling and scoring run only on a complete version, and no
weight is written while they run.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from cropi.errors import InputError
from cropi.rollout.base import SamplingParams, Trajectory
from cropi.spec import JobSpec

DTYPES = ("auto", "float32", "bfloat16", "float16")

Request = tuple[Sequence[str], int, SamplingParams]
NamedTensors = Iterable[tuple[str, torch.Tensor]]


@dataclass(frozen=True)
class RolloutConfig:
    """How to build a replica's engine (plain values: it travels to Ray actors)."""

    model_path: str
    dtype: str = "float32"
    engine: str = "hf"
    batch_size: int = 256
    tensor_parallel: int = 1
    gpu_memory_utilization: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        if self.engine not in REPLICA_BUILDERS:
            raise InputError(f"rollout.engine: unknown engine {self.engine!r}; known: {', '.join(REPLICA_BUILDERS)}")
        if not self.model_path:
            raise InputError("model.path: empty (expected a HF model folder, a hub id or builtin:tiny-arith)")
        if self.dtype not in DTYPES:
            raise InputError(f"model.dtype: {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.batch_size < 1 or self.tensor_parallel < 1:
            raise InputError("rollout.batch_size and rollout.tensor_parallel must be at least 1")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise InputError("rollout.gpu_memory_utilization must be in (0, 1]")

    @classmethod
    def from_spec(cls, spec: JobSpec, model_path: str | None = None) -> RolloutConfig:
        r = spec.rollout
        return cls(model_path=model_path or spec.model.path, dtype=spec.model.dtype, engine=r.engine,
                   batch_size=r.batch_size, tensor_parallel=r.tensor_parallel,
                   gpu_memory_utilization=r.gpu_memory_utilization, seed=spec.seed)


class ReplicaEngine(Protocol):
    def generate_many(self, requests: Sequence[Request]) -> list[list[list[Trajectory]]]: ...

    def load_weights(self, named_tensors: NamedTensors) -> int: ...

    def score(self, prompt_ids: Sequence[int], response_ids: Sequence[int], temperature: float) -> list[float]: ...


class HFReplicaEngine:
    """The HF engine on a replica: requests run one after another, each exactly as on its own.

    Each request keeps its own seeded generator and its own padding and
    chunking, so its trajectories equal `HFRolloutEngine.generate` of that
    request alone (the inline executor's draws). Merging requests into one
    padded batch would change both the random stream and the padding.
    """

    def __init__(self, model: Any, tokenizer: Any, batch_size: int):
        from cropi.executors.ray.weight_sync import named_weights
        from cropi.rollout.hf import HFRolloutEngine

        model.eval().requires_grad_(False)  # a replica samples, never trains
        self.model, self.tokenizer = model, tokenizer
        self.rollout = HFRolloutEngine(model, tokenizer, batch_size)
        self._targets = dict(named_weights(model))

    @property
    def weight_names(self) -> frozenset[str]:
        return frozenset(self._targets)

    def generate_many(self, requests: Sequence[Request]) -> list[list[list[Trajectory]]]:
        return [self.rollout.generate(prompts, n, sampling) for prompts, n, sampling in requests]

    def load_weights(self, named_tensors: NamedTensors) -> int:
        from cropi.executors.ray.weight_sync import copy_weights

        named = list(named_tensors)
        copy_weights(self._targets, named)
        return len(named)

    @torch.no_grad()
    def score(self, prompt_ids: Sequence[int], response_ids: Sequence[int], temperature: float) -> list[float]:
        from cropi.rl.batch import collate, response_logits, token_logprobs

        fixed = Trajectory(prompt_ids=list(prompt_ids), response_ids=list(response_ids),
                           logprobs=[0.0] * len(response_ids), text="", finished=False)
        batch = collate([fixed], self.tokenizer.pad_token_id).to(next(self.model.parameters()).device)
        logp = token_logprobs(response_logits(self.model, batch, temperature), batch.response_ids)
        return logp[0, : len(response_ids)].tolist()


class RolloutReplica:
    """An engine plus the weights it holds: (owner, version).

    The owner is the job whose weights these are and the version that job's
    trainer step (0: the base weights of `model_path`). A standing service
    serves one job after another, so a version number alone would let a new
    job's request for its version 3 be answered with the last job's version
    57; callers therefore wait for (their job, >= their version).
    """

    def __init__(self, engine: ReplicaEngine, weight_names: frozenset[str],
                 base_weights: Callable[[], NamedTensors] | None = None, owner: str | None = None):
        self.engine = engine
        self.weight_names = weight_names  # what a streamed version must deliver to count as complete
        self._base_weights = base_weights
        self._cond = threading.Condition()
        self._owner, self._version = owner, 0
        self._pristine = True  # still holding the base weights it was built with
        self._partial: tuple[int, set[str]] | None = None  # a streamed version being applied, names so far

    @property
    def version(self) -> int:
        return self._version

    @property
    def owner(self) -> str | None:
        return self._owner

    def holds(self, owner: str | None, min_version: int) -> bool:
        """Whether the replica holds `owner`'s weights at `min_version` or later (owner None: anyone's)."""
        return (owner is None or self._owner == owner) and self._version >= min_version

    # ----------------------------------------------------------- work
    def generate_many(self, requests: Sequence[Request], wait_s: float) -> list[list[list[Trajectory]]]:
        with self._consistent(wait_s):
            return self.engine.generate_many(requests)

    def logprobs(self, prompt_ids: Sequence[int], response_ids: Sequence[int], temperature: float,
                 wait_s: float) -> list[float]:
        with self._consistent(wait_s):
            return self.engine.score(prompt_ids, response_ids, temperature)

    # ----------------------------------------------------------- weights
    def load_weights(self, named_tensors: NamedTensors, version: int, owner: str | None = None) -> int:
        """A whole version at once (possibly a subset of the weights: the rest stay as they are)."""
        with self._cond:
            self._pristine = False
            count = self.engine.load_weights(named_tensors)
            self._set(owner if owner is not None else self._owner, version)
        return count

    def apply_bucket(self, named_tensors: list[tuple[str, torch.Tensor]], version: int,
                     owner: str | None = None) -> None:
        """One bucket of a streamed version; the version counts once every weight has arrived."""
        with self._cond:
            if self._partial is None or self._partial[0] != version:
                self._partial = (version, set())
            self.engine.load_weights(named_tensors)
            self._pristine = False
            self._partial[1].update(name for name, _ in named_tensors)
            if self._partial[1] >= self.weight_names:
                self._set(owner if owner is not None else self._owner, version)

    def load_weights_from_store(self, store_url: str, prefix: str, version: int, owner: str | None = None) -> int:
        """The object-store path: an HF folder stored under `prefix` (read before taking the lock)."""
        from cropi.executors.ray.weight_sync import published_weights
        from cropi.runtime.config import open_store

        return self.load_weights(published_weights(open_store(store_url), prefix), version, owner)

    def load_base(self, owner: str | None) -> None:
        """Start `owner`'s run: the base weights as its version 0 (reloaded unless never replaced)."""
        if not self._pristine:
            if self._base_weights is None:
                raise RuntimeError("this replica cannot reload its base weights (built without a source)")
            self.load_weights(self._base_weights(), 0, owner)
        with self._cond:
            self._set(owner, 0)
            self._pristine = True

    def _set(self, owner: str | None, version: int) -> None:
        """Call holding the lock: a complete version is in place."""
        self._owner, self._version, self._partial = owner, version, None
        self._cond.notify_all()

    @contextmanager
    def _consistent(self, wait_s: float) -> Iterator[None]:
        """Hold the lock, once no streamed version is half-applied (bounded wait)."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._partial is None, timeout=wait_s):
                version, names = self._partial  # type: ignore[misc]
                raise TimeoutError(
                    f"rollout replica: weights version {version} is half-applied ({len(names)} of "
                    f"{len(self.weight_names)} weights arrived) after {wait_s:.0f}s; the sender stopped "
                    "mid-version and no complete version followed")
            yield


def _hf_replica(config: RolloutConfig, owner: str | None) -> RolloutReplica:
    from cropi.executors.ray.weight_sync import named_weights
    from cropi.models.loading import load_policy

    model, tokenizer = load_policy(config.model_path, config.dtype)
    if torch.cuda.is_available():  # only when Ray gave this replica a GPU
        model.to("cuda")
    engine = HFReplicaEngine(model, tokenizer, config.batch_size)

    def hf_base() -> NamedTensors:  # built as at start, so tied and derived weights come out alike
        return named_weights(load_policy(config.model_path, config.dtype)[0])

    return RolloutReplica(engine, engine.weight_names, hf_base, owner)


def _vllm_replica(config: RolloutConfig, owner: str | None) -> RolloutReplica:
    from cropi.devices import local_dtype
    from cropi.rollout.vllm import VLLMRolloutEngine

    vllm_engine = VLLMRolloutEngine(
        config.model_path, dtype=local_dtype(config.dtype), tensor_parallel_size=config.tensor_parallel,
        gpu_memory_utilization=config.gpu_memory_utilization, seed=config.seed,
        # Beyond one GPU, vLLM's workers are Ray actors in the replica's placement group.
        distributed_executor_backend="ray" if config.tensor_parallel > 1 else None,
    )
    return RolloutReplica(vllm_engine, hf_weight_names(config.model_path),
                          lambda: checkpoint_weights(config.model_path), owner)


# `rollout.engine` -> how a replica of it is built.
REPLICA_BUILDERS: dict[str, Callable[[RolloutConfig, str | None], RolloutReplica]] = {
    "hf": _hf_replica, "vllm": _vllm_replica,
}


def build_replica(config: RolloutConfig, owner: str | None = None) -> RolloutReplica:
    """Load the model and build the engine that `config` names (its base weights belong to `owner`)."""
    return REPLICA_BUILDERS[config.engine](config, owner)


def checkpoint_weights(model_path: str) -> NamedTensors:
    """The tensors of a model's safetensors files (vLLM maps checkpoint names to its own itself)."""
    from pathlib import Path

    from cropi.models.loading import resolve_model_path
    from cropi.rollout.vllm import checkpoint_tensors

    folder = resolve_model_path(model_path)
    if not Path(folder).is_dir():  # a hub id: the files the replica loaded at start are in the local cache
        from huggingface_hub import snapshot_download

        folder = snapshot_download(model_path, allow_patterns=["*.safetensors"])
    return checkpoint_tensors(folder)


def hf_weight_names(model_path: str) -> frozenset[str]:
    """The weight names a trainer of this architecture sends, from a weightless (meta) copy of the model."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from cropi.executors.ray.weight_sync import named_weights
    from cropi.models.loading import resolve_model_path

    config = AutoConfig.from_pretrained(resolve_model_path(model_path))
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    return frozenset(name for name, _ in named_weights(skeleton))
