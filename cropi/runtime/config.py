"""Where the services find Redis and the object store (flags or environment).

    CROPI_REDIS_URL     redis://host:6379/0, unix:///path/redis.sock
    CROPI_STORE         a folder path, file:///folder, or s3://bucket[/prefix]
    CROPI_S3_ENDPOINT   host:port of the S3/MinIO endpoint (for s3:// stores)
    CROPI_S3_ACCESS_KEY, CROPI_S3_SECRET_KEY: static keys; without them the AWS credential chain
                        (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY/AWS_SESSION_TOKEN, IRSA's
                        AWS_WEB_IDENTITY_TOKEN_FILE + AWS_ROLE_ARN, ~/.aws/credentials, EKS Pod
                        Identity, an instance role: cropi/runtime/s3creds.py)
    CROPI_S3_SECURE     1 for https
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from cropi.errors import InputError
from cropi.runtime.store import LocalStore, ObjectStore


def redis_client(url: str | None = None, outage_s: float = 60.0) -> redis.Redis:
    """A client that rides out a Redis restart: connection errors are retried with backoff for ~`outage_s`."""
    url = url or os.environ.get("CROPI_REDIS_URL")
    if not url:
        raise InputError("no Redis: pass --redis URL or set CROPI_REDIS_URL (e.g. redis://localhost:6379/0)")
    retry = Retry(ExponentialBackoff(cap=2.0, base=0.05), retries=max(1, int(outage_s / 2.0) + 6))
    try:
        return redis.Redis.from_url(url, socket_timeout=30, socket_connect_timeout=5, health_check_interval=10,
                                    retry=retry, retry_on_error=[redis.ConnectionError, redis.TimeoutError])
    except ValueError as err:
        raise InputError(f"--redis / CROPI_REDIS_URL: {err}") from None


def open_store(url: str | None = None) -> ObjectStore:
    url = url or os.environ.get("CROPI_STORE")
    if not url:
        raise InputError("no object store: pass --store (a folder or s3://bucket/prefix) or set CROPI_STORE")
    parsed = urlparse(url)
    if parsed.scheme == "s3":
        from cropi.runtime.s3store import S3Store

        endpoint = os.environ.get("CROPI_S3_ENDPOINT")
        if not endpoint:
            raise InputError(f"store {url}: set CROPI_S3_ENDPOINT (host:port of the S3/MinIO endpoint)")
        access, secret = os.environ.get("CROPI_S3_ACCESS_KEY"), os.environ.get("CROPI_S3_SECRET_KEY")
        if bool(access) != bool(secret):
            raise InputError(f"store {url}: set both CROPI_S3_ACCESS_KEY and CROPI_S3_SECRET_KEY, or neither "
                             "(then the AWS credential chain: AWS_* variables, IRSA, an instance role)")
        # No static keys: S3Store builds the credential chain (and says what it tried when it finds nothing).
        return S3Store(endpoint, parsed.netloc, access, secret, secure=os.environ.get("CROPI_S3_SECURE") == "1",
                       prefix=parsed.path.strip("/"))
    if parsed.scheme in ("", "file"):
        return LocalStore(Path(parsed.path if parsed.scheme == "file" else url))
    raise InputError(f"store {url}: unsupported scheme {parsed.scheme!r} (use a folder path or s3://)")


def redis_url_of(client: redis.Redis) -> str:
    """The URL another process (a Ray worker) opens to reach the same Redis as `client`."""
    kw = client.connection_pool.connection_kwargs
    auth = f":{kw['password']}@" if kw.get("password") else ""
    if kw.get("path"):
        return f"unix://{auth}{kw['path']}?db={kw.get('db', 0)}"
    scheme = "rediss" if client.connection_pool.connection_class.__name__ == "SSLConnection" else "redis"
    return f"{scheme}://{auth}{kw.get('host', 'localhost')}:{kw.get('port', 6379)}/{kw.get('db', 0)}"
