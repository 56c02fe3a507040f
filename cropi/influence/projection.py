"""Sparse random projection of per-prompt gradients (docs/design.md §2.3, step 3).

`SparseProjector(dim=k, sparse_ratio=r, seed, block=B)` maps a gradient,
given as `(parameter name, tensor)` pieces, to `z in R^k`.

The sketch: block-shifted CountSketch
------------------------------------
Each parameter's flattened coordinates (row-major, as `tensor.reshape(-1)`)
are cut into blocks of `B` contiguous coordinates, block `b` holding the
coordinates `b*B .. b*B+B-1`. One 64-bit hash per block,

    h = splitmix64(pkey + b * 0x9E3779B97F4A7C15),
    pkey = splitmix64(splitmix64(seed ^ C) ^ blake2b64(parameter name)),

decides everything about the block: it is kept iff `h >> 32 < thr` with
`thr = round(r * 2^32)` (so with probability `r_eff = thr / 2^32`), its sign
`s_b` is bit 31 of `h` (set: +1), its bucket offset `o_b` is
`((h mod 2^31) * k) >> 31`, in [0, k).
Coordinate `i = b*B + j` of a kept block adds `s_b * g_i / sqrt(r_eff)` to
`z[(o_b + j) mod k]`. Unkept blocks contribute nothing.

Unbiased: two different coordinates either sit in different blocks (signs
independent, cross term has mean 0) or in the same block (distinct buckets,
since `B <= k`); a coordinate with itself is kept with probability `r_eff`
and scaled by `1/r_eff`. Hence `E[<Pg, Ph>] = <g, h>`.

Why blocks. A per-coordinate CountSketch hashes every coordinate and
scatters it to a random bucket; with subsampling it also reads memory in a
random pattern. Here one hash serves `B` coordinates, unkept blocks are
skipped without being read (with `B = 64` fp32 a block is four cache lines),
and a kept block is two contiguous, vectorisable `z[a:a+m] += s * g[c:c+m]`
adds. The kernel reads each kept coordinate once, which is what §2.3 asks
for ("near the memory-bandwidth limit").

Variance caveat. The coordinates of a block share one keep decision and one
sign, and are shifted together. For vectors whose coordinates are unrelated
within a block (e.g. random), the variance matches a CountSketch:
`Var[<Pg,Ph>] ~ (|g|^2 |h|^2 + <g,h>^2) / k`, plus the subsampling term
`(1-r)/r * sum_b (sum_{i in b} g_i h_i)^2` (a per-coordinate sketch would
have `sum_i g_i^2 h_i^2` there). When products `g_i h_i` are correlated along
a block (smooth or same-signed runs of coordinates) both terms grow, by up
to about a factor `B` for the subsampling term and `2B/3` for the collision
term in the worst case of block-constant vectors. A smaller `block` trades
speed for less of this; `block=1` is an ordinary subsampled CountSketch.

Determinism and streaming
-------------------------
No RNG state: everything is a function of (seed, name, block index), the
same on every process and machine. `Accumulator.add(name, chunk, offset)`
takes a flat chunk starting at coordinate `offset` of a parameter; chunks
may split blocks. Rule: chunks of one parameter arrive in increasing,
non-overlapping offset order (gaps mean zeros); this is checked. The
kernel then performs, for each parameter, exactly the same fp32 operations
in the same order however the parameter is chunked (coordinate order), and
each parameter has its own fp32 partial vector; `result()` sums the
partials in sorted-name order. So the result is bit-identical for any
parameter arrival order and any chunking. Chunks of one parameter projected
on different processes (e.g. ZeRO-3 shards on different ranks) and then
summed are equal only up to fp32 rounding; to keep bit-identity, feed a
parameter's shards to one accumulator in offset order.

Memory: one fp32 k-vector per parameter name, plus at most `_PIECE`
coordinates of conversion buffer when a chunk is not already a contiguous
fp32 CPU tensor (fp16/bf16, non-contiguous, GPU); never a flattened copy of
the gradient.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable

import numpy as np
import torch

from cropi.errors import InputError
from cropi.influence._kernels import MASK64, mix64_py
from cropi.influence.accumulators import Accumulator, BatchAccumulator

__all__ = ["Accumulator", "BatchAccumulator", "DenseGaussianProjector", "SparseProjector", "HASH_VERSION", "name_hash"]

#: Bumped whenever the hash scheme changes (projections of different versions
#: are not comparable). Store it alongside saved projections.
HASH_VERSION = 1

_SEED_SALT = 0x43524F5049534B31  # "CROPISK1"
_SEGMENT = 1 << 21  # coordinates per independently sketched segment (rounded to whole blocks)


def name_hash(name: str) -> int:
    """Stable 64-bit hash of a parameter name (blake2b, not Python's salted hash)."""
    digest = hashlib.blake2b(name.encode("utf-8"), digest_size=8, person=b"cropi-proj").digest()
    return int.from_bytes(digest, "little")


def _param_key(seed: int, name: str) -> int:
    return mix64_py(mix64_py((seed & MASK64) ^ _SEED_SALT) ^ name_hash(name))


class SparseProjector:
    """Block-shifted sparse sketch `R^d -> R^k` (see the module docstring).

    dim: output dimension k. sparse_ratio: fraction of blocks kept, in (0, 1].
    seed: any int (taken mod 2^64). block: coordinates per block, 1 <= block <= dim.
    """

    def __init__(self, dim: int, sparse_ratio: float, seed: int, block: int = 64, *,
                 segment: int = _SEGMENT) -> None:
        if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0:
            raise InputError(f"projection dim must be a positive integer, got {dim!r}")
        if dim >= 1 << 31:
            raise InputError(f"projection dim must be below 2^31, got {dim}")
        if isinstance(sparse_ratio, bool) or not isinstance(sparse_ratio, (int, float)) or not (0.0 < float(sparse_ratio) <= 1.0):
            raise InputError(f"sparse_ratio must be in (0, 1], got {sparse_ratio!r}")
        if isinstance(block, bool) or not isinstance(block, int) or block <= 0:
            raise InputError(f"block must be a positive integer, got {block!r}")
        if block > dim:
            raise InputError(f"block ({block}) must not exceed the projection dim ({dim})")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise InputError(f"seed must be an integer, got {seed!r}")
        self.dim = dim
        self.sparse_ratio = float(sparse_ratio)
        self.seed = seed
        self.block = block
        self.threshold = min(1 << 32, max(1, round(self.sparse_ratio * (1 << 32))))
        self.effective_ratio = self.threshold / (1 << 32)
        self.scale = np.float32(1.0 / math.sqrt(self.effective_ratio))
        # Coordinates per independently sketched segment (whole blocks). It changes only the
        # order of fp32 additions, not the sketch; tests make it small to cover many segments.
        self.segment = block * max(1, segment // block)
        self._keys: dict[str, int] = {}

    def __repr__(self) -> str:
        return (
            f"SparseProjector(dim={self.dim}, sparse_ratio={self.sparse_ratio}, "
            f"seed={self.seed}, block={self.block})"
        )

    def describe(self) -> dict:
        """What identifies the projection; store it with saved projections."""
        return {
            "kind": "block_shifted_sketch",
            "hash_version": HASH_VERSION,
            "dim": self.dim,
            "sparse_ratio": self.sparse_ratio,
            "seed": self.seed,
            "block": self.block,
        }

    def param_key(self, name: str) -> int:
        key = self._keys.get(name)
        if key is None:
            key = self._keys[name] = _param_key(self.seed, name)
        return key

    def new_accumulator(self) -> Accumulator:
        return Accumulator(self)

    def new_batch(self, rows: int) -> BatchAccumulator:
        """Accumulators for `rows` gradients that arrive together, parameter by parameter."""
        return BatchAccumulator(self, rows)

    def project_flat(self, named: Iterable[tuple[str, torch.Tensor]]) -> torch.Tensor:
        """Project a whole gradient given as `(name, tensor)` pairs; fp32 [k]."""
        acc = self.new_accumulator()
        for name, grad in named:
            acc.add(name, grad)
        return acc.result()


# --------------------------------------------------------------------------
# A dense reference, for the benchmarks and tests.


class DenseGaussianProjector:
    """TRAK-style dense reference: `z = G g / sqrt(k)`, `G ~ N(0, 1)^{k x d}`
    drawn from a seeded `torch.Generator`. Costs `2dk` FLOPs and `4dk` bytes:
    small `d` only (tests, benchmarks)."""

    def __init__(self, dim: int, d: int, seed: int) -> None:
        if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0:
            raise InputError(f"projection dim must be a positive integer, got {dim!r}")
        if isinstance(d, bool) or not isinstance(d, int) or d <= 0:
            raise InputError(f"input dimension d must be a positive integer, got {d!r}")
        self.dim = dim
        self.d = d
        self.seed = seed
        gen = torch.Generator().manual_seed(seed)
        self.matrix = torch.randn(dim, d, generator=gen, dtype=torch.float32) / math.sqrt(dim)

    def project(self, g: torch.Tensor) -> torch.Tensor:
        g = g.detach().reshape(-1).to(torch.float32)
        if g.numel() != self.d:
            raise InputError(f"expected a vector of {self.d} coordinates, got {g.numel()}")
        return self.matrix @ g

    def project_flat(self, named: Iterable[tuple[str, torch.Tensor]]) -> torch.Tensor:
        """Concatenate the pieces in the given order and project."""
        return self.project(torch.cat([t.detach().reshape(-1).to(torch.float32) for _, t in named]))
