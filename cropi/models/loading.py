"""Load a policy and its tokenizer from `model.path`: the built-in tiny
model, a local HF folder, or a hub id (for users who have network access or
a populated HF cache)."""

from __future__ import annotations

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

from cropi.errors import InputError
from cropi.models.tiny import ensure_tiny_model

BUILTIN_TINY = "builtin:tiny-arith"


def resolve_model_path(path: str, progress: Callable[[int, int, float], None] | None = None) -> str:
    """A loadable folder or hub id; builds the built-in model on first use."""
    if path.startswith("builtin:"):
        name, _, query = path.partition("?")
        if name != BUILTIN_TINY:
            raise InputError(f"model.path: unknown built-in model {name!r}; known: {BUILTIN_TINY}")
        return str(ensure_tiny_model(query, progress))
    local = Path(path).expanduser()
    looks_local = path.startswith(("/", ".", "~")) or path.count("/") != 1
    if local.exists():
        if not (local / "config.json").is_file():
            raise InputError(f"model.path: {path} exists but has no config.json (not a HF model folder)")
        return str(local)
    if looks_local:
        raise InputError(f"model.path: {path} does not exist (expected a HF model folder or an 'org/name' hub id)")
    return path


def load_policy(
    path: str, dtype: str = "float32", progress: Callable[[int, int, float], None] | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
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
