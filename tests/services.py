"""A local cropi "cluster" for tests: real redis-server, a store folder (or S3),
and each service as its own `cropi serve` process, talking only through them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import yaml

from cropi.runtime.redis_server import RedisServer, free_port

from .conftest import TEST_MODEL, cli_command

TOKEN = "test-token-0123456789"
WORKERS = ("rollout", "projector", "trainer")


class LocalCluster:
    def __init__(self, redis: RedisServer, store: str, logs: Path, env: dict[str, str] | None = None,
                 visibility_timeout: float = 5.0):
        self.redis = redis
        self.store = store
        self.logs = logs
        self.env = {**os.environ, "CROPI_TOKEN": TOKEN, "OMP_NUM_THREADS": "1", **(env or {})}
        self.visibility_timeout = visibility_timeout
        self.port = free_port()
        self.procs: dict[str, subprocess.Popen] = {}
        logs.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, service: str, name: str | None = None, *extra: str) -> subprocess.Popen:
        name = name or service
        args = ["serve", service, "--redis", self.redis.url, "--store", self.store,
                "--visibility-timeout", str(self.visibility_timeout), *extra]
        if service == "controller":
            args += ["--port", str(self.port)]
        else:
            args += ["--name", name]
        log = open(self.logs / f"{name}.log", "a")
        proc = subprocess.Popen(cli_command(*args), stdout=log, stderr=subprocess.STDOUT, env=self.env)
        self.procs[name] = proc
        if service == "controller":
            self.wait_healthy()
        return proc

    def start_all(self) -> LocalCluster:
        self.start("controller")
        for w in WORKERS:
            self.start(w)
        return self

    def kill(self, name: str) -> None:
        proc = self.procs.pop(name)
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    def stop_all(self) -> None:
        for proc in self.procs.values():
            proc.send_signal(signal.SIGKILL)
        for proc in self.procs.values():
            proc.wait()
        self.procs.clear()

    def client(self, token: str = TOKEN) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {token}"}, timeout=30)

    def wait_healthy(self, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"controller not healthy after {timeout_s} s; log: {self.log('controller')}")

    def log(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text()[-3000:] if path.exists() else ""

    def wait_phase(self, job: str, phases: tuple[str, ...] = ("done", "failed", "cancelled"),
                   timeout_s: float = 400, until=None) -> dict:
        deadline = time.monotonic() + timeout_s
        with self.client() as c:
            while time.monotonic() < deadline:
                try:
                    status = c.get(f"/v1/jobs/{job}").json()
                except httpx.HTTPError:
                    status = {}
                if status.get("phase") in phases or (until is not None and until(status)):
                    return status
                time.sleep(0.2)
        logs = "\n".join(f"--- {n}\n{self.log(n)}" for n in ("controller", *WORKERS))
        raise TimeoutError(f"job {job} not in {phases} after {timeout_s} s: {status}\n{logs}")


JOB = {
    "name": "svc-e2e",
    "model": {"path": TEST_MODEL},
    "data": {
        # 1-digit max/add: the barely trained test model solves a few of them
        # sometimes, which gives mixed rewards (eligible prompts) without a stand-in verifier.
        "pool": {"source": "builtin:arith?skills=max,add&digits=1", "size": 48},
        "validation": [{"name": "max1", "source": "builtin:arith?skills=max&digits=1", "size": 16}],
    },
    "rollout": {"n": 8, "max_new_tokens": 4},
    "offline": {"n_pool": 8, "n_valid": 16},
    "rl": {"batch_prompts": 4, "warmup_steps": 2},
    "curriculum": {"selector": "cropi", "stages": 2, "steps_per_stage": 3, "select_ratio": 0.25},
    "influence": {"proj_dim": 256, "max_valid_prompts": 16},
    "eval": {"every": 2, "samples": 2},
}
TIMING = {"rollout_s", "train_s", "seconds"}


def comparable_metrics(records):
    return [{k: v for k, v in r.items() if k not in TIMING and k != "stage"} for r in records]


def stored_selections(store, job, stages=2):
    """Each stage's selection.json from an object store (or a store folder), without its timing."""
    from cropi.runtime.store import LocalStore

    if not hasattr(store, "get"):
        store = LocalStore(store)
    out = []
    for s in range(stages):
        sel = json.loads(store.get(f"jobs/{job}/stages/{s}/selection.json"))
        sel.pop("seconds")
        out.append(sel)
    return out


def submit(cluster, job=JOB) -> None:
    with cluster.client() as c:
        r = c.post("/v1/jobs", json={"spec": yaml.safe_dump(job)})
    assert r.status_code == 201, r.text


