"""Load a policy and its tokenizer from `model.path`: the built-in tiny
model, a local HF folder, or a hub id (for users who have network access or
a populated HF cache)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from cropi.data.access import data_access
from cropi.devices import local_dtype
from cropi.errors import InputError
from cropi.models.tiny import TinyRecipe, ensure_tiny_model

BUILTIN_TINY = "builtin:tiny-arith"


def check_model_path(path: str) -> None:
    """Refuse a `model.path` that can never load, without loading or building anything: an unknown
    built-in model or option, a missing folder, a folder that is not a HF model. A hub id passes
    (whether the hub has it is the workers' to find)."""
    if path.startswith("builtin:"):
        name, _, query = path.partition("?")
        if name != BUILTIN_TINY:
            raise InputError(f"model.path: unknown built-in model {name!r}; known: {BUILTIN_TINY}")
        try:
            TinyRecipe.from_query(query)
        except InputError as err:
            raise InputError(f"model.path: {err}") from None
        return
    resolve_model_path(path)


def resolve_model_path(path: str, progress: Callable[[int, int, float], None] | None = None) -> str:
    """A loadable folder or hub id; builds the built-in model on first use."""
    if path.startswith("builtin:"):
        check_model_path(path)
        return str(ensure_tiny_model(path.partition("?")[2], progress))
    access = data_access()
    looks_local = path.startswith(("/", ".", "~")) or path.count("/") != 1
    if not looks_local and (access.restricted or not Path(path).expanduser().exists()):
        return path  # an 'org/name' hub id (in a service always: it looks at no folder of that name)
    # A service reads a model folder only under its data roots, like data (checked before the
    # folder is looked at, so that a refusal says nothing of what exists).
    local = access.local_path(path, "model.path").expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise InputError(f"model.path: {path} exists but has no config.json (not a HF model folder)")
        return str(local)
    if looks_local:
        raise InputError(f"model.path: {path} does not exist (expected a HF model folder or an 'org/name' hub id)")
    return path


@functools.lru_cache(maxsize=4)
def load_tokenizer(path: str) -> tuple[PreTrainedTokenizerBase, int | None]:
    """The tokenizer of `model.path` and the model's context length (None if its config has none),
    without loading weights."""
    from transformers import AutoConfig

    resolved = resolve_model_path(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved)
        config = AutoConfig.from_pretrained(resolved)
    except (OSError, ValueError) as err:
        raise InputError(f"model.path: cannot load the tokenizer of {path!r}: {err}") from None
    return tokenizer, getattr(config, "max_position_embeddings", None)


def load_policy(
    path: str, dtype: str = "float32", progress: Callable[[int, int, float], None] | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Model and tokenizer on the CPU; `dtype` "auto" is this process's own device's (`devices.py`)."""
    dtype = local_dtype(dtype)
    resolved = resolve_model_path(path, progress)
    # cropi draws its own progress bars; transformers' per-load bars are noise.
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved)
        model = AutoModelForCausalLM.from_pretrained(resolved, dtype=getattr(torch, dtype))
    except (OSError, ValueError) as err:
        raise InputError(f"model.path: cannot load {path!r}: {err}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return model, tokenizer
