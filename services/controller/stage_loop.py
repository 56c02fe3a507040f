"""The stage machine's thread: `Controller.tick()` in a loop, for as long as the
controller process lives. A failing tick (Redis restarting, the store away) is
logged and retried; the jobs' own failures are the controller's to record."""

from __future__ import annotations

import logging
import threading

from cropi.curriculum.controller import Controller

log = logging.getLogger(__name__)


class StageLoop:
    def __init__(self, controller: Controller, tick_s: float = 0.2, retry_s: float = 1.0):
        self.controller = controller
        self.tick_s = tick_s  # the wait when nothing moved
        self.retry_s = retry_s  # the wait after a tick that failed
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="stage-machine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if not self.controller.tick():
                    self._stop.wait(self.tick_s)
            except Exception:  # Redis restarting, store unreachable: log, wait, go on
                log.exception("controller tick failed; retrying")
                self.controller.resync()
                self._stop.wait(self.retry_s)
