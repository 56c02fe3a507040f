"""The object store: where trajectories, projected gradients and checkpoints
live (docs/design.md §5). This module has the interface and the local-folder
backend; the S3/MinIO backend implements the same interface.

Every object is written atomically (temp file, fsync, rename) with a SHA-256
sidecar (`<key>.sha256`). An object counts as present only when both exist,
so a crash before both are written means "absent, redo it"; since every
writer is deterministic, a redo writes the same bytes. Overwriting an object
(the trainer state, every step) is three renames: the sidecar admits the new
checksum besides the old, the bytes are replaced, the sidecar keeps only the
new; a process killed anywhere in between leaves the old or the new object,
whole and readable, never one that is refused. A write that fails (disk full,
file-size limit) raises an `OSError` naming the key and leaves the object as
it was, and no temp file behind.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path
from typing import Protocol

from cropi.errors import InputError

_SEGMENT = re.compile(r"[A-Za-z0-9_.=-]+")


class ChecksumError(IOError):
    """Stored bytes do not match their recorded checksum."""


def validate_key(key: str) -> str:
    """Keys are relative '/'-separated paths of plain segments: no '..', no absolute paths."""
    if not key or key.startswith("/") or key.endswith("/"):
        raise InputError(f"invalid storage key {key!r}: must be a relative path without a trailing '/'")
    for seg in key.split("/"):
        if seg in ("", ".", "..") or not _SEGMENT.fullmatch(seg):
            raise InputError(f"invalid storage key {key!r}: bad segment {seg!r}")
    if key.endswith(".sha256"):
        raise InputError(f"invalid storage key {key!r}: the .sha256 suffix is reserved for checksums")
    return key


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class ObjectStore(Protocol):
    def put(self, key: str, data: bytes) -> None: ...
    def get(self, key: str) -> bytes: ...
    def exists(self, key: str) -> bool: ...
    def list(self, prefix: str) -> list[str]: ...
    def size(self, key: str) -> int: ...

    @property
    def url(self) -> str: ...


def _checksums(check: Path) -> list[str]:
    return check.read_bytes().decode("ascii", "replace").split()


class LocalStore:
    """A folder on disk laid out exactly like the bucket."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        """What `open_store` reopens this store from (in another process or Ray actor)."""
        return str(self.root.resolve())

    def _path(self, key: str) -> Path:
        return self.root / validate_key(key)

    @staticmethod
    def _atomic_write(path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        check = path.with_name(path.name + ".sha256")
        digest = sha256(data)
        try:
            old = _checksums(check) if check.is_file() else []
            if len(old) > 1:  # an earlier overwrite was interrupted: which of its checksums is stored?
                old = [sha256(path.read_bytes())] if path.is_file() else []
            if old != [digest]:
                self._atomic_write(check, "\n".join([digest, *old]).encode())
            self._atomic_write(path, data)  # also when the checksum is the same: a redo repairs damaged bytes
            if old and old != [digest]:
                self._atomic_write(check, digest.encode())
        except OSError as err:
            raise OSError(err.errno, f"{err.strerror}: cannot store object {key!r} in {self.root}") from err

    def get(self, key: str) -> bytes:
        path = self._path(key)
        check = path.with_name(path.name + ".sha256")
        if not (path.is_file() and check.is_file()):
            raise FileNotFoundError(f"object {key!r} not found in {self.root}")
        data = path.read_bytes()
        if sha256(data) not in _checksums(check):  # two lines while an overwrite is under way
            raise ChecksumError(f"object {key!r} in {self.root} is corrupted (checksum mismatch)")
        return data

    def exists(self, key: str) -> bool:
        path = self._path(key)
        return path.is_file() and path.with_name(path.name + ".sha256").is_file()

    def size(self, key: str) -> int:
        """The object's length in bytes, without reading it."""
        if not self.exists(key):
            raise FileNotFoundError(f"object {key!r} not found in {self.root}")
        return self._path(key).stat().st_size

    def list(self, prefix: str) -> list[str]:
        base = self.root / prefix if prefix else self.root
        if not base.exists():
            return []
        keys = []
        for p in base.rglob("*"):
            if p.is_file() and not p.name.endswith(".sha256") and not p.name.startswith("."):
                key = p.relative_to(self.root).as_posix()
                if self.exists(key):
                    keys.append(key)
        return sorted(keys)
