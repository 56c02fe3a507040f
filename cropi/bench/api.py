"""`cropi bench api`: latency of the controller API under concurrent status
requests. A real `cropi serve controller` process on a private redis-server;
N status requests fired at once; p50/p99 reported, beside the same burst
against /healthz (a route that only pings Redis) as the baseline."""

from __future__ import annotations

import asyncio
import os
import statistics
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from cropi.runtime.redis_server import RedisServer, free_port
from cropi.spec import parse_spec

TOKEN = "bench-token-0123456789"


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


async def _burst(url: str, path: str, n: int) -> tuple[list[float], int]:
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, limits=limits,
                                 timeout=60) as client:
        async def one() -> tuple[float, int]:
            t0 = time.perf_counter()
            r = await client.get(path)
            return time.perf_counter() - t0, r.status_code

        results = await asyncio.gather(*(one() for _ in range(n)))
    return [t for t, _ in results], sum(1 for _, code in results if code != 200)


def run_api_bench(requests: int = 200, rounds: int = 3) -> dict:
    with tempfile.TemporaryDirectory(prefix="cropi-ab-") as tmp:
        server = RedisServer(Path(tmp) / "redis").start()
        port = free_port()
        env = {**os.environ, "CROPI_TOKEN": TOKEN}
        # The installed `cropi` command, as a user starts the service (the library has no `serve`).
        cropi = shutil.which("cropi", path=str(Path(sys.executable).parent)) or "cropi"
        proc = subprocess.Popen([cropi, "serve", "controller", "--redis", server.url,
                                 "--store", str(Path(tmp) / "store"), "--port", str(port)],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("the controller did not start")
                time.sleep(0.2)
            spec = parse_spec({"name": "bench-api", "curriculum": {"selector": "full", "stages": 1}})
            httpx.post(f"{url}/v1/jobs", json={"spec": spec.to_yaml()},
                       headers={"Authorization": f"Bearer {TOKEN}"}).raise_for_status()
            asyncio.run(_burst(url, "/healthz", 20))  # warm up connections and code paths
            report: dict = {"requests": requests, "rounds": rounds}
            for name, path in (("status", "/v1/jobs/bench-api"), ("healthz", "/healthz")):
                latencies, errors = [], 0
                for _ in range(rounds):
                    lat, err = asyncio.run(_burst(url, path, requests))
                    latencies += lat
                    errors += err
                report[name] = {"p50_ms": 1000 * statistics.median(latencies),
                                "p99_ms": 1000 * _percentile(latencies, 0.99), "errors": errors}
            report["status_p99_over_healthz_p99"] = report["status"]["p99_ms"] / report["healthz"]["p99_ms"]
            return report
        finally:
            proc.terminate()
            proc.wait(timeout=10)
            server.stop()
