"""A user's function named in a spec: `module:function` (importable where the
job runs) or `path/to/file.py:function` (a file on this machine; relative
paths from the current folder; in a service, under its data roots, see
`cropi/data/access.py`). Loaded once per process.

Reading a spec never runs the user's code: `check_function_ref` (what the
spec's validators call, in the controller's API too) only checks the name's
form, that the file exists where this process may read it, or that the
module's top-level package is installed. The code runs where the rewards
are computed (`load_function`, in the workers), and `cropi run` imports it
before it starts, so that a typo fails at once."""

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

from cropi.data.access import data_access
from cropi.errors import InputError


def is_function_ref(text: str) -> bool:
    return ":" in text and not text.startswith(("builtin:", "hf:"))


def _parts(ref: str) -> tuple[str, str]:
    target, _, name = ref.rpartition(":")
    if not target or not name.isidentifier():
        raise ValueError("expected module:function or path/to/file.py:function")
    if not target.endswith(".py") and not all(p.isidentifier() for p in target.split(".")):
        raise ValueError("expected module:function (a dotted module name) or path/to/file.py:function")
    return target, name


def _user_file(target: str) -> Path:
    try:
        return _resolved(data_access(), target)
    except InputError as err:
        raise ValueError(str(err)) from None


@functools.lru_cache(maxsize=64)
def _resolved(access: Any, target: str) -> Path:
    # Per policy and name (a refusal is not cached): rewards look the file up once per response.
    return access.user_file(target, "")


def check_function_ref(ref: str) -> None:
    """ValueError unless `ref` names a function that can be loaded here, judged without running
    any of its code: the file exists (under the data roots in a service), or the module's
    top-level package is installed."""
    target, _ = _parts(ref)
    if target.endswith(".py"):
        _user_file(target)
        return
    top = target.split(".")[0]
    try:
        found = importlib.util.find_spec(top)  # a top-level name: finds, imports nothing
    except (ImportError, ValueError):
        found = None
    if found is None:
        raise ValueError(f"cannot import module {target!r}: no module named {top!r}")


def load_function(ref: str, arity: int) -> Callable[..., Any]:
    """The function `ref` names; ValueError saying what is wrong (not found, not callable,
    cannot take `arity` positional arguments, a file this process may not read)."""
    target, _ = _parts(ref)
    path = _user_file(target) if target.endswith(".py") else None  # the policy first, every time
    return _load(ref, arity, str(path) if path else None)


@functools.lru_cache(maxsize=64)
def _load(ref: str, arity: int, path: str | None) -> Callable[..., Any]:
    target, _, name = ref.rpartition(":")
    if path is not None:
        module_name = "cropi_user_" + hashlib.sha1(path.encode()).hexdigest()[:12]
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
