"""`cropi serve SERVICE`: what each container of the chart runs (the tests start them as processes).

    controller  the HTTP API and the stage machine (`services/controller/api.py`)
    rollout     offline tasks        projector  project tasks        trainer  train tasks

A worker service is `cropi.runtime.worker.Worker` with the executors of
`cropi.executors`: it runs the tasks of `executor: inline` jobs itself and
hands those of `executor: ray` jobs to Ray.

Every service reads job data under the data-source policy of
`cropi/data/access.py`: local paths only under `CROPI_DATA_ROOTS`, s3://
sources only from the object store's own bucket.
"""

from __future__ import annotations


import typer
from rich.console import Console

from cropi.errors import InputError

err_console = Console(stderr=True)


def serve(
    service: str = typer.Argument(..., help="controller | rollout | projector | trainer"),
    redis_url: str | None = typer.Option(None, "--redis", help="Redis URL (default: CROPI_REDIS_URL)"),
    store_url: str | None = typer.Option(None, "--store", help="folder or s3://bucket/prefix (default: CROPI_STORE)"),
    host: str = typer.Option("127.0.0.1", "--host", help="controller: address to listen on"),
    port: int = typer.Option(8080, "--port", help="controller: port to listen on"),
    consumer: str | None = typer.Option(None, "--name", help="worker name (default: <service>-<hostname>-<pid>)"),
    visibility_timeout: float = typer.Option(60.0, "--visibility-timeout", min=0.1,
                                             help="seconds of worker silence before its task is reclaimed"),
    max_attempts: int = typer.Option(3, "--max-attempts", min=1, help="deliveries before a task is dead-lettered"),
    metrics_port: int | None = typer.Option(None, "--metrics-port", help="workers: serve Prometheus /metrics here"),
    parallel: int = typer.Option(1, "--parallel", min=1,
                                 help="workers: tasks run at once (a projector feeding a Ray pool: its actors)"),
) -> None:
    """Start one service (what the containers run; the tests start them as processes).

    A worker runs the tasks of `executor: inline` jobs itself and hands those of
    `executor: ray` jobs to Ray (the projection pool, the Ray Serve rollout
    service, Ray Train), joining the job's `ray.address` or RAY_ADDRESS.
    """
    import logging
    import os
    import signal
    import socket
    import threading

    from cropi.data.access import DataAccess, set_data_access
    from cropi.runtime.config import open_store, redis_client
    from cropi.runtime.jobs import JobRegistry
    from cropi.runtime.queue import TaskBus

    services = ("controller", "rollout", "projector", "trainer")
    if service not in services:
        raise InputError(f"serve: unknown service {service!r} (choose from {', '.join(services)})")
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {service} %(levelname)s %(message)s")
    client = redis_client(redis_url)
    store = open_store(store_url)
    # Data sources: local paths only under CROPI_DATA_ROOTS, s3:// only from this store's bucket.
    set_data_access(DataAccess.for_service(store))
    bus = TaskBus(client, visibility_timeout_s=visibility_timeout, max_attempts=max_attempts)
    jobs = JobRegistry(client)
    if service == "controller":
        from services.controller import api

        token = os.environ.get("CROPI_TOKEN", "")
        if not token and os.environ.get("CROPI_TOKEN_FILE"):
            token = open(os.environ["CROPI_TOKEN_FILE"]).read().strip()
        api.serve(host, port, bus, jobs, store, token)
        return
    from cropi.executors import JobExecutors
    from cropi.runtime.tasks import SERVICE_KINDS
    from cropi.runtime.worker import Worker

    name = consumer or f"{service}-{socket.gethostname()}-{os.getpid()}"
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    metrics = None
    if metrics_port:
        from cropi.runtime.metrics import WorkerMetrics

        metrics = WorkerMetrics(bus, SERVICE_KINDS[service])
        metrics.serve(metrics_port, host)
    err_console.print(f"{service} worker {name}: consuming {', '.join(SERVICE_KINDS[service])} tasks")
    executors = JobExecutors(store, track=True)  # train tasks log to their jobs' trackers from here
    worker = Worker(SERVICE_KINDS[service], bus, jobs, executors, name, metrics=metrics, parallel=parallel)
    try:
        worker.run(stop)
    finally:
        executors.close()
