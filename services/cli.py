"""The installed `cropi` command: the library's command line plus `cropi serve`.

This is the composition root of the command line: `cropi.cli` cannot offer
`serve`, since starting a service imports deployable code (the controller's
HTTP API) that the library never imports.
"""

from __future__ import annotations

from cropi.cli import app, run_app
from services.serve import serve

app.command()(serve)


def main() -> None:
    run_app(app)


if __name__ == "__main__":
    main()
