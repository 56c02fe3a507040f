"""Connecting to Ray: a remote cluster when an address is given, else a local one.

Every Ray component of cropi calls `init_ray` first, so a process uses one
Ray session whichever component starts it.
"""

from __future__ import annotations

import logging
import os
import threading
import time

import ray

log = logging.getLogger(__name__)

# Local Ray declares at least this many logical CPUs: the pool, the rollout
# replica and the trainer workers hold their actors while the embedded run
# works through its tasks one at a time, so logical CPUs may exceed cores.
MIN_LOCAL_CPUS = 6

# Each actor declares one or more CPUs; these keep torch/numba/BLAS from
# starting a thread per core in every actor (2 actors x 2 cores x threads).
_THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def actor_env(threads: int = 1) -> dict[str, str]:
    """Environment for an actor that should use `threads` CPU threads."""
    return {name: str(threads) for name in _THREAD_ENV}


# What actors on other nodes need from the driver's environment (they do not inherit it): the
# built-in model's cache, the HF cache settings, the object store's credentials and a service's data
# policy (cropi/data/access.py: a service's actors read only under its data roots).
_FORWARDED_VARS = ("CROPI_CACHE", "HF_HOME", "HF_HUB_OFFLINE", "CROPI_DATA_POLICY", "CROPI_DATA_ROOTS")
_FORWARDED_PREFIXES = ("CROPI_S3_", "AWS_")


def forwarded_env() -> dict[str, str]:
    """The driver's variables every cropi actor and Ray Train worker gets."""
    return {k: v for k, v in os.environ.items() if k in _FORWARDED_VARS or k.startswith(_FORWARDED_PREFIXES)}


# Joining a remote cluster is tried this many times, `CONNECT_BACKOFF_S` doubling in between: a
# worker pod may start before the head, and Ray Client's proxy sometimes fails to start the
# per-connection server under load ("Starting Ray client server failed").
CONNECT_ATTEMPTS = 4
CONNECT_BACKOFF_S = 2.0

# A worker running tasks in parallel threads may call init_ray from several at once; two
# concurrent ray.init calls would open two Ray Client sessions in one process.
_init_lock = threading.Lock()


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join Ray once per process: `address` (or RAY_ADDRESS), else start a local instance."""
    with _init_lock:
        if ray.is_initialized():
            return
        address = address or os.environ.get("RAY_ADDRESS") or None
        common = dict(namespace="cropi", log_to_driver=False, ignore_reinit_error=True)
        if address:
            _join(address, common)
            return
        cpus = num_cpus or max(os.cpu_count() or 1, MIN_LOCAL_CPUS)
        # address="local": a new instance, never a `ray start` cluster that happens to run on this machine.
        ray.init(address="local", num_cpus=cpus, num_gpus=0 if not _has_cuda() else None, include_dashboard=False,
                 runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}}, **common)


def _join(address: str, options: dict) -> None:
    for attempt in range(1, CONNECT_ATTEMPTS + 1):
        try:
            ray.init(address=address, **options)
            return
        except ConnectionError as err:  # Ray Client's failures (ConnectionAbortedError among them)
            if attempt == CONNECT_ATTEMPTS:
                raise ConnectionError(f"could not join Ray at {address} after {attempt} attempts: {err}") from err
            pause = CONNECT_BACKOFF_S * 2 ** (attempt - 1)
            log.warning("joining Ray at %s failed (attempt %d of %d), retrying in %.0f s: %s",
                        address, attempt, CONNECT_ATTEMPTS, pause, str(err).splitlines()[0])
            time.sleep(pause)


def shutdown_ray() -> None:
    if ray.is_initialized():
        ray.shutdown()


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()
