"""A user's function named in a spec: `module:function` (importable where the
job runs) or `path/to/file.py:function` (a file on this machine; relative
paths from the current folder). Loaded once per process."""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


def is_function_ref(text: str) -> bool:
    return ":" in text and not text.startswith(("builtin:", "hf:"))


@functools.lru_cache(maxsize=64)
def load_function(ref: str, arity: int) -> Callable[..., Any]:
    """The function `ref` names; ValueError saying what is wrong (not found, not callable,
    cannot take `arity` positional arguments)."""
    target, _, name = ref.rpartition(":")
    if not target or not name.isidentifier():
        raise ValueError(f"expected module:function or path/to/file.py:function, got {ref!r}")
    if target.endswith(".py"):
        path = Path(target).expanduser().resolve()
        if not path.is_file():
            raise ValueError(f"file {target} not found (relative paths start at the current folder)")
        module_name = "cropi_user_" + hashlib.sha1(str(path).encode()).hexdigest()[:12]
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as err:
            sys.modules.pop(module_name, None)
            raise ValueError(f"importing {target} failed: {type(err).__name__}: {err}") from None
    else:
        try:
            module = importlib.import_module(target)
        except Exception as err:
            raise ValueError(f"cannot import module {target!r}: {type(err).__name__}: {err}") from None
    fn = getattr(module, name, None)
    if fn is None:
        raise ValueError(f"{target} has no attribute {name!r}")
    if not callable(fn):
        raise ValueError(f"{ref} is not callable")
    try:
        inspect.signature(fn).bind(*range(arity))
    except TypeError:
        raise ValueError(f"{ref} must accept {arity} positional arguments") from None
    except ValueError:  # no signature (a builtin): let the call decide
        pass
    return fn
