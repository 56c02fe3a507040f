"""The stage machine's thread: `Controller.tick()` in a loop, for as long as the
controller process lives. A failing tick (Redis restarting, the store away) is
logged and retried; the jobs' own failures are the controller's to record.

With a lease (`StageLoop.leased`, what the controller service runs), of the
replicas sharing one Redis only the lease's holder ticks (cropi/runtime/lease.py):

- not holding: try to acquire every `poll_s` (`renew_s`); the others wait, answering the API;
- acquired: the controller writes through `JobRegistry.fenced(token)`, and a
  thread of its own renews the lease every `renew_s` (ttl/3), whatever a tick does;
- lost (a fenced write refused, the lease found another's, or not renewed for a
  ttl): stop ticking at once, `controller.resync()`, and go back to acquiring;
- stopped: the lease is released, so that another replica takes it at once.

A holder that stalls past its lease and writes afterwards is refused by the
fence, not by the lease: the token it carries is no longer the fence's.
"""

from __future__ import annotations

import logging
import threading

from cropi.curriculum.controller import Controller
from cropi.runtime.lease import ControllerLease, LeaseLost, ttl_from_env

log = logging.getLogger(__name__)


class StageLoop:
    def __init__(self, controller: Controller, tick_s: float = 0.2, retry_s: float = 1.0,
                 lease: ControllerLease | None = None, poll_s: float | None = None):
        self.controller = controller
        self.tick_s = tick_s  # the wait when nothing moved
        self.retry_s = retry_s  # the wait after a tick that failed
        self.lease = lease  # None: tick unconditionally (one controller, nothing to share with)
        # The wait between attempts to acquire the lease (default: its renewal period).
        self.poll_s = poll_s if poll_s is not None else lease.renew_s if lease is not None else tick_s
        self.registry = controller.jobs  # unfenced; the controller gets fenced views of it while holding
        self.token: int | None = None  # the fencing token while this loop holds the lease
        self.ticks = 0  # ticks run (with a lease: only while holding it)
        self._stop = threading.Event()
        self._lock = threading.Lock()  # the lease's state, shared with the renewing thread
        self._renew_refused = False
        self._seen_holder: str | None = None
        self._thread: threading.Thread | None = None
        self._renewer: threading.Thread | None = None

    @classmethod
    def leased(cls, controller: Controller, tick_s: float = 0.2, **kwargs) -> StageLoop:
        """The controller service's loop: a lease on the controller's Redis (`CROPI_LEASE_TTL_S`)."""
        jobs = controller.jobs
        return cls(controller, tick_s=tick_s, lease=ControllerLease(jobs.r, jobs.prefix, ttl_s=ttl_from_env()),
                   **kwargs)

    @property
    def holding(self) -> bool:
        return self.token is not None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="stage-machine", daemon=True)
        self._thread.start()
        if self.lease is not None:
            self._renewer = threading.Thread(target=self._renew_loop, name="lease-renewer", daemon=True)
            self._renewer.start()

    def stop(self, release: bool = True, join_s: float = 10.0) -> None:
        """Stop ticking; with a lease, wait for the tick under way, then release the lease
        (`release=False`: leave it to expire, as a killed process does)."""
        self._stop.set()
        if self.lease is None:
            return
        for thread in (self._thread, self._renewer):
            if thread is not None and thread is not threading.current_thread():
                thread.join(join_s)
        with self._lock:
            if self.token is None:
                return
            self.token = None
            if not release:
                return
            try:
                self.lease.release()
                log.info("controller lease released by %s", self.lease.holder)
            except Exception as err:  # Redis away: the lease expires by itself
                log.warning("controller lease not released (%s); it expires in %.0f s", err, self.lease.ttl_s)

    # ------------------------------------------------------------ the loop
    def _run(self) -> None:
        while not self._stop.is_set():
            if self.lease is not None and not self._hold():
                self._stop.wait(self.poll_s)
                continue
            try:
                self.ticks += 1
                moved = self.controller.tick()
            except LeaseLost as err:
                self._lose(f"a write was refused: {err}")
                continue
            except Exception:  # Redis restarting, store unreachable: log, wait, go on
                log.exception("controller tick failed; retrying")
                self.controller.resync()
                self._stop.wait(self.retry_s)
                continue
            if not moved:
                self._stop.wait(self.tick_s)

    def _hold(self) -> bool:
        """True if this loop holds the lease (acquiring it if it is free); False: do not tick."""
        lease = self.lease
        assert lease is not None
        if self.token is not None:
            if self._renew_refused:
                self._lose("the lease is another replica's now")
            elif not lease.held:
                self._lose(f"not renewed for {lease.ttl_s:g} s")
            else:
                return True
        with self._lock:
            if self._stop.is_set():
                return False
            try:
                token = lease.acquire()
                holder = None if token is not None else lease.holder_now()
            except Exception as err:  # Redis away: try again later
                log.warning("controller lease: cannot reach Redis (%s); retrying", err)
                return False
            if token is None:
                if holder != self._seen_holder:
                    log.info("controller lease held by %s; %s waits", holder, lease.holder)
                    self._seen_holder = holder
                return False
            self.token, self._renew_refused, self._seen_holder = token, False, None
            self.controller.jobs = self.registry.fenced(token)
        log.info("controller lease acquired by %s (fencing token %d): acting", lease.holder, token)
        return True

    def _lose(self, reason: str) -> None:
        with self._lock:
            if self.token is None:
                return
            token, self.token = self.token, None
        # The controller keeps the stale view: a write still under way is refused, not made.
        log.info("controller lease lost by %s (fencing token %d): %s; waiting for it again",
                 self.lease.holder if self.lease else "?", token, reason)
        self.controller.resync()

    def _renew_loop(self) -> None:
        lease = self.lease
        assert lease is not None
        while not self._stop.wait(lease.renew_s):
            with self._lock:
                if self.token is None or self._stop.is_set():
                    continue
                try:
                    if not lease.renew():
                        self._renew_refused = True
                except Exception as err:  # Redis away: the next renewal may make it; past a ttl it is lost
                    log.warning("controller lease not renewed (%s); retrying", err)
