"""Error types shared by the library and the CLI.

`InputError` is the one exception that means "the user gave us something
wrong": the CLI prints its message (no traceback) and exits with code 2.
Everything else is a bug or an environment failure and exits with 1.
"""


class InputError(ValueError):
    """Bad user input: a spec field, a data file, a model path, a query."""
