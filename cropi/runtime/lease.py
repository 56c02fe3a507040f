"""The controller's lease: of the controller replicas sharing one Redis, only
the holder runs the stage machine (docs/design.md §6).

    <p>:controller:lease   string: the holder's id, with a PX expiry (the lease's ttl); renewed by
                           the holder every ttl/3, released (deleted) by it when it stops
    <p>:controller:fence   integer: the fencing token, INCR'ed on every acquisition (monotonic)

Acquiring is `SET <lease> <holder> NX PX <ttl>` and, in the same script, `INCR
<fence>`: the holder's token. Renewing and releasing compare the lease's value
with the holder's id first (a Lua compare-and-set), so that a replica whose
lease expired and was taken never renews or deletes the new holder's.

A lease alone does not stop a holder that stalled past its expiry (a long GC,
a lost network) from writing after another replica took over. The token does:
while it holds the lease the controller writes through `JobRegistry.fenced(token)`,
whose writes check, in the same Lua script, that the token is still the current
value of `<p>:controller:fence`, and are refused with `LeaseLost` otherwise.

`CROPI_LEASE_TTL_S` (default 15) sets the ttl of the controller service's lease.
"""

from __future__ import annotations

import os
import secrets
import socket
import time

import redis

from cropi.errors import InputError

DEFAULT_TTL_S = 15.0
TTL_ENV = "CROPI_LEASE_TTL_S"

# KEYS: lease, fence. ARGV: holder, ttl ms. A lease already this holder's is taken again (a new token).
_ACQUIRE = """
local current = redis.call('GET', KEYS[1])
if current == false then
  redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2])
elseif current == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
else
  return false
end
return redis.call('INCR', KEYS[2])
"""
# KEYS: lease. ARGV: holder, ttl ms.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
# KEYS: lease. ARGV: holder.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class LeaseLost(Exception):
    """The controller's lease is no longer this holder's: a fenced write was refused, or renewal failed."""


def lease_key(prefix: str) -> str:
    return f"{prefix}:controller:lease"


def fence_key(prefix: str) -> str:
    return f"{prefix}:controller:fence"


def ttl_from_env(default: float = DEFAULT_TTL_S) -> float:
    """`CROPI_LEASE_TTL_S`: the controller lease's ttl in seconds."""
    raw = os.environ.get(TTL_ENV, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise InputError(f"{TTL_ENV}: not a number of seconds") from None
    if not 0.1 <= value < 3600:
        raise InputError(f"{TTL_ENV}: must be between 0.1 and 3600 seconds")
    return value


def default_holder() -> str:
    """host-pid-random: unique per process (a restarted pod is a new holder), readable in the logs."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"


class ControllerLease:
    """One replica's side of the lease. `acquire()` -> a token or None; `renew()` -> still held."""

    def __init__(self, client: redis.Redis, prefix: str = "cropi", holder: str | None = None,
                 ttl_s: float = DEFAULT_TTL_S, renew_s: float | None = None):
        if ttl_s <= 0:
            raise InputError("a lease's ttl must be positive")
        self.r = client
        self.prefix = prefix
        self.holder = holder or default_holder()
        self.ttl_s = ttl_s
        self.renew_s = renew_s if renew_s is not None else ttl_s / 3  # renewed well before it expires
        self.key = lease_key(prefix)
        self.fence_key = fence_key(prefix)
        self.token: int | None = None  # the token of the current holding, None while not held
        self.renewed_at = 0.0  # time.monotonic() of the last acquisition or renewal
        self._acquire = client.register_script(_ACQUIRE)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)

    @property
    def _ttl_ms(self) -> int:
        return max(1, int(self.ttl_s * 1000))

    def acquire(self) -> int | None:
        """Take the lease if it is free (or already ours): the new fencing token, else None."""
        asked = time.monotonic()  # the lease runs from before the call, not after the reply
        token = self._acquire(keys=[self.key, self.fence_key], args=[self.holder, self._ttl_ms])
        if token is None:
            self.token = None
            return None
        self.token = int(token)
        self.renewed_at = asked
        return self.token

    def renew(self) -> bool:
        """Extend the lease by its ttl; False (and no longer held) if it is not ours any more."""
        if self.token is None:
            return False
        asked = time.monotonic()
        if self._renew(keys=[self.key], args=[self.holder, self._ttl_ms]) == 1:
            self.renewed_at = asked
            return True
        self.token = None
        return False

    @property
    def held(self) -> bool:
        """Held as far as this replica can tell: acquired or renewed less than a ttl ago."""
        return self.token is not None and time.monotonic() - self.renewed_at < self.ttl_s

    def release(self) -> bool:
        """Give the lease up (only if it is still ours), so another replica takes it without waiting."""
        self.token = None
        return self._release(keys=[self.key], args=[self.holder]) == 1

    def holder_now(self) -> str | None:
        """Who holds the lease in Redis (None: nobody)."""
        value = self.r.get(self.key)
        return value.decode() if value is not None else None

    def current_token(self) -> int:
        """The fence's current value: the last acquisition's token (0: never acquired)."""
        return int(self.r.get(self.fence_key) or 0)
