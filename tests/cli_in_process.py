"""`cropi ARGS` run in the test's own process through the installed entry point (no interpreter
start-up per call): its exit code and its output with the terminal's line wraps undone."""

from __future__ import annotations

import sys


def run_cropi(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    from services.cli import main

    monkeypatch.setattr(sys, "argv", ["cropi", *args])
    capsys.readouterr()
    try:
        main()
        code = 0
    except SystemExit as exit_:
        code = exit_.code or 0
    out = capsys.readouterr()
    return code, " ".join((out.out + out.err).split())
