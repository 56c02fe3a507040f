"""Progress that reads well wherever the output goes.

On a terminal (`console.is_terminal`) a rich bar; anywhere else (nohup, a
pod's log, CI) plain lines, one when a run starts, at every tenth of its
total and at least every `every_s` seconds, and one when it ends:

    stage 0 GRPO: step 12/40 (30%) reward 0.42 acc add1=0.31 | elapsed 0:01:05, ETA 0:02:31

A rich bar's live display is never drawn off a terminal: it would be
printed once, at its end, cut to the console's width ('40/…').
"""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress

PLAIN_EVERY_S = 30.0


def clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class LiveProgress:
    """One task's progress (`label`: plain text; `unit`: what is counted, e.g. 'step', 'part')."""

    def __init__(self, console: Console, label: str, total: int, completed: int = 0, unit: str = "",
                 text: str = "", transient: bool = False, every_s: float = PLAIN_EVERY_S):
        self.console, self.label, self.total, self.unit = console, label, max(total, 0), unit
        self.completed, self.text, self.every_s = completed, text, every_s
        self._start_completed, self._t0 = completed, time.monotonic()
        self._bar: RichProgress | None = None
        if console.is_terminal:
            self._bar = RichProgress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[text]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                     console=console, transient=transient)
            self._bar.start()
            self._task = self._bar.add_task(label, total=self.total, completed=completed, text=text)
        else:
            self._printed_at, self._tenth = self._t0, self._tenths(completed)
            self._line()

    def _tenths(self, completed: int) -> int:
        return completed * 10 // self.total if self.total else 10

    def update(self, completed: int, text: str | None = None) -> None:
        self.completed = completed
        if text is not None:
            self.text = text
        if self._bar is not None:
            self._bar.update(self._task, completed=completed, text=self.text)
            return
        now, tenth = time.monotonic(), self._tenths(completed)
        if tenth > self._tenth or now - self._printed_at >= self.every_s:
            self._tenth = max(self._tenth, tenth)
            self._line()

    def advance(self, n: int = 1) -> None:
        self.update(self.completed + n)

    def stop(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
        elif self._printed != self.completed:
            self._line()

    def _line(self) -> None:
        self._printed, self._printed_at = self.completed, time.monotonic()
        elapsed = self._printed_at - self._t0
        done = self.completed - self._start_completed
        pct = f" ({100 * self.completed // self.total}%)" if self.total else ""
        if self.completed >= self.total:
            eta = "done"
        elif done > 0:
            eta = f"ETA {clock(elapsed / done * (self.total - self.completed))}"
        else:
            eta = "ETA ?"
        unit = f"{self.unit} " if self.unit else ""
        text = f" {self.text}" if self.text else ""
        self.console.print(f"{self.label}: {unit}{self.completed}/{self.total}{pct}{text} | elapsed {clock(elapsed)}, "
                           f"{eta}", markup=False, highlight=False, soft_wrap=True)
