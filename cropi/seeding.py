"""Seeds derived from names: every random draw in cropi is seeded by a pure
function of (job seed, what it is for, where it happens), so a resumed or
re-run job, or another executor, makes the same draws."""

from __future__ import annotations

import hashlib


def stream_seed(*parts: object) -> int:
    """A stable 64-bit seed from any parts (Python's hash() is salted per process)."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little")
