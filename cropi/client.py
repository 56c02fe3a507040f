"""HTTP client of the controller API, used by `cropi submit|status|list|cancel|logs|fetch`.

Configured by `--controller URL` / `CROPI_CONTROLLER` and `CROPI_TOKEN`
(or `CROPI_TOKEN_FILE`). A 4xx answer is the user's input being refused:
it becomes an InputError (exit 2) carrying the server's message.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from cropi.errors import InputError


class ControllerError(RuntimeError):
    """The controller could not be reached or failed (exit 1)."""


TENANT_HEADER = "X-Cropi-Tenant"  # the operator's token only: the tenant (namespace) a request acts for
BUSY_RETRIES = 30  # a GET answered 429 (e.g. every long-poll slot taken) is retried this often


def _token() -> str:
    token = os.environ.get("CROPI_TOKEN", "")
    if not token and os.environ.get("CROPI_TOKEN_FILE"):
        try:
            token = open(os.environ["CROPI_TOKEN_FILE"]).read().strip()
        except OSError as err:
            raise InputError(f"CROPI_TOKEN_FILE: {err}") from None
    if not token:
        raise InputError("no API token: set CROPI_TOKEN (or CROPI_TOKEN_FILE) to the controller's bearer token")
    return token


class ControllerClient:
    def __init__(self, url: str | None = None, token: str | None = None, timeout_s: float = 30.0):
        url = url or os.environ.get("CROPI_CONTROLLER")
        if not url:
            raise InputError("no controller: pass --controller URL or set CROPI_CONTROLLER (e.g. http://localhost:8080)")
        if not url.startswith(("http://", "https://")):
            raise InputError(f"--controller / CROPI_CONTROLLER: {url!r} is not an http(s) URL")
        self.url = url.rstrip("/")
        self.http = httpx.Client(base_url=self.url, timeout=timeout_s,
                                 headers={"Authorization": f"Bearer {token or _token()}"})

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        for attempt in range(BUSY_RETRIES + 1):
            try:
                r = self.http.request(method, path, **kwargs)
            except httpx.HTTPError as err:
                raise ControllerError(f"controller {self.url} unreachable: {err}") from None
            if r.status_code != 429 or method != "GET" or attempt == BUSY_RETRIES:
                break
            time.sleep(_retry_after(r))
        self._refused(r)
        return r.json()

    def _refused(self, r: httpx.Response) -> None:
        """Raise for an answer that is not a success (InputError for 4xx, ControllerError else)."""
        if r.status_code == 429:
            raise ControllerError(f"controller busy (429): {response_detail(r)}")
        if r.status_code == 401:
            raise InputError(f"controller {self.url} refused the token (401): check CROPI_TOKEN")
        if 400 <= r.status_code < 500:
            raise InputError(f"controller refused the request ({r.status_code}): {response_detail(r)}")
        if r.status_code >= 500:
            raise ControllerError(f"controller error ({r.status_code}): {response_detail(r)}")

    def submit(self, spec_yaml: str) -> dict[str, Any]:
        return self._call("POST", "/v1/jobs", json={"spec": spec_yaml})

    def status(self, job: str) -> dict[str, Any]:
        return self._call("GET", job_path(job))

    def list(self) -> list[dict[str, Any]]:
        return self._call("GET", "/v1/jobs")

    def cancel(self, job: str) -> dict[str, Any]:
        return self._call("POST", job_path(job, "cancel"))

    def resume(self, job: str) -> dict[str, Any]:
        return self._call("POST", job_path(job, "resume"))

    def events(self, job: str, after: str = "0-0", wait_ms: int = 0) -> list[dict[str, Any]]:
        return self._call("GET", job_path(job, "events"), params={"after": after, "wait_ms": wait_ms},
                          timeout=wait_ms / 1000 + 30)

    def artifacts(self, job: str) -> dict[str, Any]:
        """{"name", "phase", "artifacts": [{"path", "size"}]}: what `download` can fetch of the job."""
        return self._call("GET", job_path(job, "artifacts"))

    def download(self, job: str, path: str, dest: Path, progress: Callable[[int], None] | None = None) -> int:
        """Stream artifact `path` of the job into file `dest` (written whole or not at all: a temp
        file beside it, its SHA-256 and length checked, then renamed); returns its length."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        url = job_path(job, "artifacts/" + "/".join(quote(seg, safe="") for seg in path.split("/")))
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
        try:
            with os.fdopen(fd, "wb") as f, self.http.stream("GET", url, timeout=httpx.Timeout(60.0)) as r:
                if r.status_code != 200:
                    r.read()
                    self._refused(r)
                digest, size = hashlib.sha256(), 0
                for chunk in r.iter_bytes(1 << 20):
                    f.write(chunk)
                    digest.update(chunk)
                    size += len(chunk)
                    if progress:
                        progress(len(chunk))
            expected = r.headers.get("x-cropi-sha256")
            if expected and digest.hexdigest() != expected:
                raise ControllerError(f"artifact {path} of job {job}: the download does not match its checksum")
            os.replace(tmp, dest)
            return size
        except httpx.HTTPError as err:
            raise ControllerError(f"controller {self.url}: downloading {path} failed: {err}") from None
        finally:
            Path(tmp).unlink(missing_ok=True)


def job_path(job: str, action: str = "") -> str:
    """The API path of a job (and an action on it). The name is one escaped path segment, so that
    `cropi cancel ../jobs/x` asks about a job named '../jobs/x' (there is none), not about x."""
    path = f"/v1/jobs/{quote(job, safe='')}"
    return f"{path}/{action}" if action else path


def _retry_after(r: httpx.Response) -> float:
    """The seconds a busy controller asked to wait (Retry-After), within 0.1-5 s."""
    try:
        return min(5.0, max(0.1, float(r.headers.get("retry-after", "1"))))
    except ValueError:
        return 1.0


def response_detail(r: httpx.Response) -> str:
    """The controller's reason for refusing a request, fit for a one-line message."""
    try:
        detail = r.json().get("detail", r.text)
    except ValueError:
        return r.text[:500]
    if isinstance(detail, list):  # FastAPI validation errors: name each field
        return "; ".join(f"{'.'.join(str(x) for x in d.get('loc', []))}: {d.get('msg')}" for d in detail)
    return str(detail)
