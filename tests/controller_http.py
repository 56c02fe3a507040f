"""A controller app served over real HTTP on loopback, in a thread, for the tests that drive it
with the real client (`cropi submit`, the operator's handlers).

    with serve_app(create_app(...)) as url:
        ControllerClient(url, TOKEN).list()
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn
from fastapi import FastAPI

from cropi.runtime.redis_server import free_port


@contextmanager
def serve_app(app: FastAPI, start_timeout_s: float = 20) -> Iterator[str]:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout_s
    while not server.started:
        assert time.monotonic() < deadline, "controller did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
