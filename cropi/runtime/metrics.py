"""Prometheus metrics of a worker service (`cropi serve <worker> --metrics-port`).

The controller's metrics (queue depth, job stage/step/accuracy) are served by
its API at /metrics; a worker serves its own: task latency and outcomes per
kind, the depth of the queues it consumes, and, for the trainer, the last
step and reward.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily

from cropi.runtime.queue import TaskBus


class _QueueDepth:
    def __init__(self, bus: TaskBus, kinds: list[str]):
        self.bus, self.kinds = bus, kinds

    def collect(self):
        family = GaugeMetricFamily("cropi_queue_depth", "tasks per kind and state", labels=["kind", "state"])
        for kind in self.kinds:
            try:
                depth = self.bus.depth(kind)
            except Exception:  # Redis away: report nothing rather than fail the scrape
                continue
            for state, n in depth.items():
                family.add_metric([kind, state], n)
        yield family


class WorkerMetrics:
    def __init__(self, bus: TaskBus, kinds: list[str]):
        self.registry = CollectorRegistry()
        self.task_seconds = Histogram("cropi_task_seconds", "handler time per task", ["kind"], registry=self.registry,
                                      buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800))
        self.tasks = Counter("cropi_tasks", "tasks handled, by outcome", ["kind", "outcome"], registry=self.registry)
        self.step = Gauge("cropi_trainer_step", "last completed training step", ["job"], registry=self.registry)
        self.reward = Gauge("cropi_trainer_reward", "mean rollout reward of the last step", ["job"],
                            registry=self.registry)
        self.accuracy = Gauge("cropi_trainer_eval", "latest evaluation summary", ["job", "metric"],
                              registry=self.registry)
        self.registry.register(_QueueDepth(bus, kinds))

    def serve(self, port: int, host: str = "0.0.0.0") -> None:
        start_http_server(port, addr=host, registry=self.registry)
