"""Where a job's data may come from: the data-source policy of a process.

A job spec names its data (data files, dataset folders, verifier files) by
path, so whoever may submit a job would choose what a service pod reads. The
services (`cropi serve`) therefore read data under a policy set once per
process with `set_data_access(DataAccess.for_service(store))`:

- a local path is read only when, with symlinks and `..` resolved
  (realpath), it lies under one of the data roots (`CROPI_DATA_ROOTS`: an
  os.pathsep- or comma-separated list of absolute folders). With no roots
  configured, no local path is read. The check comes before anything looks
  at the path, and what it says does not depend on whether the path exists;
- `s3://bucket/key` (an object, or a folder prefix) is read from the job's
  object store: only where that store is S3, only from its own bucket, with
  its credentials.

Everything else (`cropi run`, benches, tests) keeps `EMBEDDED`: any path the
user can read, relative paths from the current folder, and no s3:// sources.
Ray actors started by a service inherit the policy's kind through
`POLICY_ENV` (forwarded with `CROPI_DATA_ROOTS`); they are given the store.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from cropi.errors import InputError

ROOTS_ENV = "CROPI_DATA_ROOTS"
POLICY_ENV = "CROPI_DATA_POLICY"  # "service" in a service's process and the processes it starts
S3 = "s3://"
HOW_TO_ALLOW = f"an operator allows folders with {ROOTS_ENV} (Helm: controller.dataRoots)"
MAX_FOLDER_OBJECTS = 1000  # objects under an s3:// folder prefix (a saved dataset has a handful)


class DataAccessError(InputError):
    """A data source this process may not read (said without revealing whether it exists)."""


@runtime_checkable
class BucketReader(Protocol):
    """What an s3:// source needs of the object store (`S3Store`): raw objects of its own bucket."""

    bucket: str

    def read_bucket_object(self, name: str) -> bytes: ...  # FileNotFoundError when absent
    def list_bucket(self, prefix: str, limit: int | None = None) -> list[str]: ...


def parse_roots(text: str) -> tuple[str, ...]:
    """The roots in `text` (os.pathsep- or comma-separated absolute folders), each resolved."""
    roots = []
    for entry in text.replace(",", os.pathsep).split(os.pathsep):
        entry = entry.strip()
        if not entry:
            continue
        if not os.path.isabs(entry):
            raise InputError(f"{ROOTS_ENV}: every data root must be an absolute folder; one entry is not")
        roots.append(os.path.realpath(entry))
    return tuple(dict.fromkeys(roots))


def _lead(field: str) -> str:
    return f"{field}: " if field else ""


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


@dataclass(frozen=True)
class DataAccess:
    """`roots`: None reads any path (embedded); otherwise only paths under them (none when empty).
    `store`: the S3 object store s3:// sources are read from (None: no s3:// sources)."""

    roots: tuple[str, ...] | None = None
    store: BucketReader | None = None

    @classmethod
    def for_service(cls, store: Any = None, roots: str | None = None) -> DataAccess:
        """The policy of a service: roots from `roots` or CROPI_DATA_ROOTS, s3:// from `store` if it is S3."""
        text = os.environ.get(ROOTS_ENV, "") if roots is None else roots
        return cls(parse_roots(text), store if isinstance(store, BucketReader) else None)

    @property
    def restricted(self) -> bool:
        return self.roots is not None

    def with_store(self, store: Any) -> DataAccess:
        """This policy, reading s3:// sources from `store` if it has no store yet (a Ray actor's)."""
        if self.restricted and self.store is None and isinstance(store, BucketReader):
            return replace(self, store=store)
        return self

    # ------------------------------------------------------------ local paths
    def local_path(self, path: str, field: str) -> Path:
        """The path to open for `path` (resolved under a policy), or DataAccessError naming `field`.
        Nothing about the path itself (whether it exists) is looked at before the check."""
        if self.roots is None:
            return Path(path)
        real = os.path.realpath(os.path.expanduser(path))
        if not self.roots:
            s3 = f"; or use an s3:// source in the object store's bucket (s3://{self.store.bucket}/...)" \
                if self.store is not None else ""
            raise DataAccessError(f"{_lead(field)}this service reads no local paths (no data roots are configured); "
                                  f"{HOW_TO_ALLOW}{s3}")
        if not any(_inside(real, root) for root in self.roots):
            raise DataAccessError(f"{_lead(field)}a local path must lie under the service's data roots "
                                  f"({', '.join(self.roots)}) once symlinks and '..' are resolved; {HOW_TO_ALLOW}")
        return Path(real)

    # ------------------------------------------------------------ s3:// sources
    def fetch_s3(self, url: str, field: str, dest: Path) -> Path:
        """Download the object `url` names, or every object of its folder prefix, into `dest`;
        the local file or folder. DataAccessError where this process may not read it."""
        bucket, _, key = url[len(S3):].partition("/")
        if self.store is None:
            raise DataAccessError(f"{_lead(field)}s3:// sources are read from the cluster's object store, so only by "
                                  "the services of a cluster whose store is S3 (CROPI_STORE=s3://...); this "
                                  "process has none")
        if bucket != self.store.bucket:
            raise DataAccessError(f"{_lead(field)}s3:// sources must be in the object store's own bucket "
                                  f"(s3://{self.store.bucket}/...); no other bucket is read")
        segments = key.rstrip("/").split("/")
        if not key.strip("/") or any(s in ("", ".", "..") for s in segments) or "\\" in key:
            raise InputError(f"{_lead(field)}an s3:// source names an object or a folder prefix of plain segments, "
                             "e.g. s3://bucket/datasets/gsm8k.parquet")
        folder = "/".join(segments) + "/"
        names = self.store.list_bucket(folder, MAX_FOLDER_OBJECTS + 1)
        if len(names) > MAX_FOLDER_OBJECTS:
            raise InputError(f"{_lead(field)}the s3:// folder holds more than {MAX_FOLDER_OBJECTS} objects; "
                             "a saved dataset has a handful")
        base = dest / segments[-1]
        if names:  # a folder: a dataset saved with save_to_disk
            for name in names:
                if name.endswith("/"):  # a folder marker (what consoles' "create folder" writes)
                    continue
                parts = name[len(folder):].split("/")
                if any(p in ("", ".", "..") for p in parts) or "\\" in name:
                    raise InputError(f"{_lead(field)}the s3:// folder holds an object whose name is not a plain path")
                target = base.joinpath(*parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(self.store.read_bucket_object(name))
            return base
        if key.endswith("/"):
            raise InputError(f"data file {url}: not found")
        try:
            data = self.store.read_bucket_object(key)
        except FileNotFoundError:
            raise InputError(f"data file {url}: not found") from None
        base.write_bytes(data)
        return base

    # ------------------------------------------------------------ verifier files
    def user_file(self, path: str, field: str) -> Path:
        """A user's python file (a verifier): under the roots in a service, and an existing file."""
        resolved = self.local_path(path, field)
        resolved = resolved.expanduser().resolve() if not self.restricted else resolved
        if not resolved.is_file():
            raise InputError(f"{_lead(field)}file {path} not found (relative paths start at the current folder)")
        return resolved


EMBEDDED = DataAccess()
_current: DataAccess | None = None


def set_data_access(access: DataAccess | None) -> None:
    """This process's policy (None: back to the default). A service's policy is announced to the
    processes it starts (Ray actors) through POLICY_ENV."""
    global _current
    _current = access
    if access is not None and access.restricted:
        os.environ[POLICY_ENV] = "service"
    elif os.environ.get(POLICY_ENV) == "service":
        os.environ.pop(POLICY_ENV)


def data_access() -> DataAccess:
    """This process's policy: the one set, else a service's (roots only) where POLICY_ENV says this
    process was started by one, else EMBEDDED."""
    if _current is not None:
        return _current
    if os.environ.get(POLICY_ENV) == "service":
        return DataAccess.for_service()
    return EMBEDDED
