"""Where a job computes and in what precision (docs/design.md §10).

`device: auto` is CUDA when present, else the CPU; `model.dtype: auto` is
bfloat16 on CUDA and float32 on the CPU, where half precision is slow and
DeepSpeed's CPU path is fp32 only."""

from __future__ import annotations

import re

import torch

from cropi.errors import InputError
from cropi.spec import DEVICE_PATTERN


def resolve_device(name: str) -> torch.device:
    if not re.fullmatch(DEVICE_PATTERN, name):
        raise InputError(f"device: {name!r} is not one of auto, cpu, cuda, cuda:N")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"device: {name} was asked for, but this machine has no CUDA device "
                             "(use device: auto or cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InputError(f"device: {name} was asked for, but this machine has "
                             f"{torch.cuda.device_count()} CUDA device(s)")
    return device


def resolve_dtype(dtype: str, device: torch.device) -> str:
    """The torch dtype name `model.dtype` means on `device`."""
    if dtype == "auto":
        return "bfloat16" if device.type == "cuda" else "float32"
    return dtype


def local_dtype(dtype: str) -> str:
    """`model.dtype` on this process's own device (a Ray actor: a GPU if Ray gave it one)."""
    return resolve_dtype(dtype, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
