"""A reference of the sparse projection in plain torch integer ops: each parameter
materialised, buckets and signs hashed vectorised, `index_add_` into the sketch.
Slow and memory-hungry, which is why it lives here: tests check the streamed
kernel against it."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from cropi.influence._kernels import GOLDEN, MIX1, MIX2
from cropi.influence.projection import SparseProjector


def _to_signed(x: int) -> int:
    return x - (1 << 64) if x >= 1 << 63 else x


def _srl(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 tensors holding uint64 bit patterns."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def _mix64_torch(x: torch.Tensor) -> torch.Tensor:
    # int64 multiplication wraps modulo 2^64 on every torch backend.
    x = (x ^ _srl(x, 30)) * _to_signed(MIX1)
    x = (x ^ _srl(x, 27)) * _to_signed(MIX2)
    return x ^ _srl(x, 31)


def _project_torch(projector: SparseProjector, named: Iterable[tuple[str, torch.Tensor]]) -> torch.Tensor:
    """The sketch of `named` gradients, as `SparseProjector.project_flat` computes it."""
    p = projector
    k, block = p.dim, p.block
    partials: dict[str, torch.Tensor] = {}
    for name, grad in named:
        g = grad.detach().reshape(-1).to(device="cpu", dtype=torch.float32)
        n = g.numel()
        nb = -(-n // block)
        b = torch.arange(nb, dtype=torch.int64)
        h = _mix64_torch(_to_signed(p.param_key(name)) + b * _to_signed(GOLDEN))
        kept = _srl(h, 32) < p.threshold
        bk = b[kept]
        hk = h[kept]
        o = ((hk & ((1 << 31) - 1)) * k) >> 31
        sign = torch.where((_srl(hk, 31) & 1) == 1, 1.0, -1.0).to(torch.float32) * float(p.scale)
        j = torch.arange(block, dtype=torch.int64)
        idx = (bk[:, None] * block + j[None, :]).reshape(-1)
        buckets = ((o[:, None] + j[None, :]) % k).reshape(-1)
        signs = sign[:, None].expand(-1, block).reshape(-1)
        valid = idx < n
        z = partials.setdefault(name, torch.zeros(k, dtype=torch.float32))
        z.index_add_(0, buckets[valid], signs[valid] * g[idx[valid]])
    out = torch.zeros(k, dtype=torch.float32)
    for name in sorted(partials):
        out += partials[name]
    return out
