"""Joining a remote Ray cluster: once per process, even from parallel task threads, and again
after a failed connection.

`ray.init` is replaced by a stand-in here: the failures it imitates (Ray Client's proxy failing to
start a connection's server under load, "Starting Ray client server failed") cannot be produced on
demand by a real cluster, and a real join is covered end to end by test_ray_executor."""

from __future__ import annotations

import threading
import time

import pytest

pytest.importorskip("ray", reason="the Ray executor needs the `ray` extra")

from cropi.executors.ray import cluster as ray_runtime  # noqa: E402


class FakeRay:
    """Stands in for `ray.init`/`ray.is_initialized`; fails the first `failures` joins."""

    def __init__(self, failures: int = 0, join_s: float = 0.0):
        self.failures, self.join_s = failures, join_s
        self.calls: list[str] = []
        self.connected = False

    def init(self, address: str, **options) -> None:
        self.calls.append(address)
        time.sleep(self.join_s)
        if len(self.calls) <= self.failures:
            raise ConnectionAbortedError("Initialization failure from server: Starting Ray client server failed")
        self.connected = True

    def is_initialized(self) -> bool:
        return self.connected


@pytest.fixture
def fake_ray(monkeypatch):
    def install(**kwargs) -> FakeRay:
        fake = FakeRay(**kwargs)
        monkeypatch.setattr(ray_runtime.ray, "init", fake.init)
        monkeypatch.setattr(ray_runtime.ray, "is_initialized", fake.is_initialized)
        monkeypatch.setattr(ray_runtime, "CONNECT_BACKOFF_S", 0.01)
        return fake
    return install


def test_a_failed_join_is_retried_until_it_succeeds(fake_ray):
    fake = fake_ray(failures=2)
    ray_runtime.init_ray("ray://head:10001")
    assert fake.calls == ["ray://head:10001"] * 3 and fake.connected


def test_a_join_that_keeps_failing_names_the_address_and_the_attempts(fake_ray):
    fake = fake_ray(failures=99)
    with pytest.raises(ConnectionError, match=rf"could not join Ray at ray://head:10001 after "
                                              rf"{ray_runtime.CONNECT_ATTEMPTS} attempts"):
        ray_runtime.init_ray("ray://head:10001")
    assert len(fake.calls) == ray_runtime.CONNECT_ATTEMPTS


def test_parallel_task_threads_join_once(fake_ray):
    fake = fake_ray(join_s=0.2)
    threads = [threading.Thread(target=ray_runtime.init_ray, args=("ray://head:10001",)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert fake.calls == ["ray://head:10001"]
