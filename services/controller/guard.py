"""The controller's front door: the bearer token checked before any byte of a
body is read, a body limit enforced while it streams (chunked or not), and the
Redis client the events long-polls use."""

from __future__ import annotations

from collections.abc import Callable

import redis
from fastapi.responses import JSONResponse
from redis.backoff import NoBackoff
from redis.retry import Retry
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

MAX_BODY_BYTES = 1 << 20  # a job spec is a few KB; anything near a MiB is a mistake or an attack
MAX_WAIT_MS = 30_000  # the longest events long-poll
UNAUTHORIZED = "missing or wrong bearer token"


class RequestGuard:
    """ASGI middleware in front of everything: /v1 requests without a known token are answered 401
    before their body is read, and a body is read in pieces up to MAX_BODY_BYTES (chunked or not)
    and answered 413 at the first byte over, without reading the rest."""

    def __init__(self, app: ASGIApp, identify: Callable[[str | None], object | None], limit: int = MAX_BODY_BYTES):
        self.app = app
        self.identify = identify  # Authorization header -> who, or None
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        path = scope.get("path", "")
        if (path == "/v1" or path.startswith("/v1/")) and self.identify(headers.get("authorization")) is None:
            await JSONResponse({"detail": UNAUTHORIZED}, status_code=401,
                               headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
            return
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            await self._too_large(scope, receive, send)
            return
        if length in (None, "0") and "chunked" not in headers.get("transfer-encoding", "").lower():
            await self.app(scope, receive, send)  # no body
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client went away mid-body
            body = message.get("body", b"")
            size += len(body)
            if size > self.limit:
                await self._too_large(scope, receive, send)
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replay: list[Message] = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replayed() -> Message:
            return replay.pop() if replay else await receive()

        await self.app(scope, replayed, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        await JSONResponse({"detail": f"request body larger than {self.limit} bytes"},
                           status_code=413)(scope, receive, send)


def long_poll_client(client: redis.Redis, slots: int, max_wait_s: float = MAX_WAIT_MS / 1000) -> redis.Redis:
    """A client to the same Redis for long-polls: a socket timeout above the longest wait (the shared
    client's would fire first and retry the read, tripling it), no retries of its own (the wait's
    deadline decides), and at most `slots` connections."""
    pool = client.connection_pool
    kwargs = {k: v for k, v in pool.connection_kwargs.items()
              if not k.startswith(("maint_notifications", "orig_"))}  # tied to the shared pool
    kwargs.update(socket_timeout=max_wait_s + 10, retry=Retry(NoBackoff(), 0), retry_on_error=[],
                  retry_on_timeout=False, health_check_interval=0)
    kwargs.pop("connection_class", None)
    return redis.Redis(connection_pool=redis.BlockingConnectionPool(
        connection_class=pool.connection_class, max_connections=slots, timeout=5, **kwargs))
