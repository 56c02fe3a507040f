"""The S3 backend of the object store (MinIO in production), on the `minio` client.

Same interface and key rules as `LocalStore`. A single PUT is atomic on S3
(an object is visible whole or not at all), and the SHA-256 travels with it
as object metadata, so there is no window where data and checksum disagree;
`get` verifies it. Connection errors (endpoint restarting, network blip) are
retried with exponential backoff up to `retry_deadline_s`; errors the server
answers with (no such key, access denied) are not retried.

Credentials: static keys (`access_key`, `secret_key`), or without them a credential provider, by
default the AWS chain of cropi/runtime/s3creds.py (environment, IRSA web identity, shared file,
container endpoint, instance role). A chain that finds nothing is an InputError when the store opens.
"""

from __future__ import annotations

import io
import itertools
import logging
import time
from collections.abc import Callable
from typing import TypeVar

import urllib3
from minio import Minio
from minio.credentials.providers import Provider
from minio.error import S3Error

from cropi.errors import InputError
from cropi.runtime.store import ChecksumError, sha256, validate_key

log = logging.getLogger(__name__)
T = TypeVar("T")

_META = "sha256"  # stored as x-amz-meta-sha256
_TRANSIENT = (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError, OSError)


class S3Store:
    def __init__(self, endpoint: str, bucket: str, access_key: str | None = None, secret_key: str | None = None,
                 secure: bool = False, prefix: str = "", region: str | None = None, retry_deadline_s: float = 60.0,
                 create_bucket: bool = True, credentials: Provider | None = None):
        # Fail fast per attempt (no urllib3-level retries); the backoff loop below owns retrying.
        http = urllib3.PoolManager(timeout=urllib3.Timeout(connect=2.0, read=30.0), retries=False)
        if access_key or secret_key:
            if not (access_key and secret_key) or credentials is not None:
                raise InputError(f"object store {endpoint}: give an access key and a secret key, or neither "
                                 "(then the credential chain)")
        elif credentials is None:
            from cropi.runtime.s3creds import shared_chain

            credentials = shared_chain()
        self.credentials = credentials  # None: the static keys
        self.client = Minio(endpoint, access_key=access_key, secret_key=secret_key, secure=secure,
                            region=region, http_client=http, credentials=credentials)
        self.endpoint = endpoint
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.retry_deadline_s = retry_deadline_s
        if credentials is not None:
            self._retry(self._check_credentials)
        if create_bucket:
            self._retry(self._ensure_bucket)

    @property
    def url(self) -> str:
        """What `open_store` reopens this store from; endpoint and keys come from CROPI_S3_* (or the chain) there."""
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def _check_credentials(self) -> None:
        """Fetch them now: a chain that finds none is the user's to fix, said when the store opens."""
        try:
            self.credentials.retrieve()
        except urllib3.exceptions.HTTPError as err:  # STS or a credential endpoint away: retried
            raise ConnectionError(f"credential source unreachable: {err}") from err
        except ValueError as err:
            raise InputError(f"object store {self.endpoint}: {err}. Set CROPI_S3_ACCESS_KEY and CROPI_S3_SECRET_KEY, "
                             "or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (AWS_SESSION_TOKEN), or run with a "
                             "web identity (AWS_WEB_IDENTITY_TOKEN_FILE and AWS_ROLE_ARN: IRSA) or an "
                             "instance role") from err

    def _ensure_bucket(self) -> None:
        if not self.client.bucket_exists(self.bucket):
            try:
                self.client.make_bucket(self.bucket)
            except S3Error as err:  # another process created it first
                if err.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise

    def _name(self, key: str) -> str:
        key = validate_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _retry(self, fn: Callable[[], T]) -> T:
        delay, deadline = 0.1, time.monotonic() + self.retry_deadline_s
        while True:
            try:
                return fn()
            except FileNotFoundError:  # an answer, not an outage
                raise
            except _TRANSIENT as err:
                if time.monotonic() + delay > deadline:
                    raise ConnectionError(f"object store {self.endpoint} unreachable "
                                          f"for {self.retry_deadline_s:.0f} s: {err}") from err
                log.warning("object store unreachable (%s); retrying in %.1f s", err, delay)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    def put(self, key: str, data: bytes) -> None:
        name = self._name(key)
        self._retry(lambda: self.client.put_object(
            self.bucket, name, io.BytesIO(data), len(data), metadata={_META: sha256(data)}))

    def get(self, key: str) -> bytes:
        name = self._name(key)

        def fetch() -> tuple[bytes, str | None]:
            try:
                response = self.client.get_object(self.bucket, name)
            except S3Error as err:
                if err.code == "NoSuchKey":
                    raise FileNotFoundError(f"object {key!r} not found in s3://{self.bucket}/{self.prefix}") from err
                raise
            try:
                return response.read(), response.headers.get(f"x-amz-meta-{_META}")
            finally:
                response.close()
                response.release_conn()

        data, expected = self._retry(fetch)
        if expected is None or sha256(data) != expected:
            raise ChecksumError(f"object {key!r} in s3://{self.bucket} is corrupted or has no checksum")
        return data

    def exists(self, key: str) -> bool:
        name = self._name(key)

        def stat() -> bool:
            try:
                self.client.stat_object(self.bucket, name)
                return True
            except S3Error as err:
                if err.code in ("NoSuchKey", "NoSuchObject", "ResourceNotFound"):
                    return False
                raise

        return self._retry(stat)

    def size(self, key: str) -> int:
        """The object's length in bytes, without reading it."""
        name = self._name(key)

        def stat() -> int:
            try:
                return self.client.stat_object(self.bucket, name).size
            except S3Error as err:
                if err.code in ("NoSuchKey", "NoSuchObject", "ResourceNotFound"):
                    raise FileNotFoundError(f"object {key!r} not found in s3://{self.bucket}/{self.prefix}") from err
                raise

        return self._retry(stat)

    def list(self, prefix: str) -> list[str]:
        full = f"{self.prefix}/{prefix}" if self.prefix else prefix
        strip = len(self.prefix) + 1 if self.prefix else 0
        return self._retry(lambda: sorted(
            o.object_name[strip:] for o in self.client.list_objects(self.bucket, prefix=full, recursive=True)))

    # Objects of the bucket itself (not under the prefix, no checksum: written by other tools): what an
    # `s3://bucket/key` data source reads (cropi/data/access.py).
    def read_bucket_object(self, name: str) -> bytes:
        def fetch() -> bytes:
            try:
                response = self.client.get_object(self.bucket, name)
            except S3Error as err:
                if err.code in ("NoSuchKey", "NoSuchObject", "InvalidObjectName"):
                    raise FileNotFoundError(f"s3://{self.bucket}/{name} not found") from err
                raise
            try:
                return response.read()
            finally:
                response.close()
                response.release_conn()

        return self._retry(fetch)

    def list_bucket(self, prefix: str, limit: int | None = None) -> list[str]:
        """The names under `prefix` (at most `limit` of them)."""
        return self._retry(lambda: sorted(o.object_name for o in itertools.islice(
            self.client.list_objects(self.bucket, prefix=prefix, recursive=True), limit)))
