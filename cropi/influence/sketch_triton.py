"""Triton GPU kernel for the block-shifted sparse sketch (definition: `projection.py`).

`sketch_into(g, offset, pkey, thr, k, block, scale, z)` adds the same sketch as
the numba `_kernels.sketch_chunk` to `z`, reading `g` where it lies (fp32, bf16
or fp16, no host or conversion copy). Equal to it within fp32 rounding; not
bit-identical to it, but bit-identical run to run (no float atomics).

Design. View `z` as a matrix `Z[k/B, B]` (B = block, needs `k % B == 0`). Block
`b` with bucket offset `o = q*B + r` adds its coordinates to row `q`, columns
`r..B-1`, and to row `q+1 (mod k/B)`, columns `0..r-1`. Loading the block with
its lanes rotated by `r` (lane `j` holds coordinate `(j - r) mod B`) puts every
value in the column it is added to, so a tile of T blocks is added to Z by two
matrix products with one-hot sign matrices:
`Z += A1^T @ where(j >= r, G, 0) + A2^T @ where(j < r, G, 0)`, `A1[t, q_t] = s_t`,
`A2[t, q_t+1] = s_t`: a scatter turned into tensor-core work in a fixed order.

Grid `(P, M)`: program `(p, m)` owns a contiguous range of blocks and the row tile
`[m*ROWS, (m+1)*ROWS)` of Z. Per window of W blocks it hashes them all, keeps
those that are kept by the subsampling AND touch its row tile, and compacts
them (prefix sum -> slot, written to a per-program scratch row, read back) into
dense tiles of T blocks. So unkept blocks are never read and FLOPs scale with
ROWS (4*ROWS per coordinate), not k. Each program writes its ROWS x B sums to its
slice of a `[P, k]` partials buffer; a second kernel sums the P partials in
index order, scales, and adds into z.

fp32 inputs: by default each value is split into three bf16 pieces (hi + mid +
lo = x exactly, up to fp32 subnormals) summed by three bf16 tensor-core products
(+-1 is exact in bf16, accumulation fp32); `precision="ieee"`: one fp32 product.
bf16/fp16 inputs: one product in the input dtype, +-1 weights, fp32 accumulation.

Results depend on the chunk's length and offset (they fix P and the grouping of
partial sums), the GPU and the Triton version: repeatable for a fixed chunking,
but not chunking-invariant like the CPU path.

`triton` is imported, and the kernels decorated, on first use (see `_load`):
the module imports without it.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch

__all__ = ["available", "supported", "sketch_into"]

_T = 32  # blocks per dot tile: the K dimension of the products (>= 16 for tl.dot)
_MAX_PROGRAMS = 256  # block ranges per chunk: bounds the partials buffer to 256*k fp32
_READS_PER_PARTIAL = 8.0  # bytes of g read per byte of partials traffic, at least (tests lower it)
_RB = 1024  # z entries per program of the reduction kernel
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_kernels: dict[str, Any] = {}  # decorated kernels, see `_load`
_PLAIN: dict[str, Any] = {}  # undecorated helper bodies, by global name


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available() -> bool:
    """True if triton imports and there is a GPU or TRITON_INTERPRET=1 (CPU interpreter)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return _interpret() or torch.cuda.is_available()


def supported(k: int, block: int) -> bool:
    """Whether this kernel handles (k, block): block a power of 2, >= 16, dividing k."""
    return 16 <= block <= k and block & (block - 1) == 0 and k % block == 0


# ---- Kernel bodies. Plain functions until `_load` decorates them with triton.jit;
# `tl` is bound then too (annotations stay strings thanks to the __future__ import).
tl: Any = None


def _mix64(x):
    # splitmix64 finaliser in uint64 (same constants as _kernels.MIX1/MIX2;
    # the tests check the bits against `mix64_py`). Shifts of uint64 are logical.
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB
    return x ^ (x >> 31)


def _dot(a, x, acc, UPCAST: tl.constexpr):
    if UPCAST:
        # Triton 3.9's interpreter multiplies bf16 operands as their raw uint16 bits;
        # in fp32 the same (exact) products are formed, so only the interpreter takes this.
        acc = tl.dot(a.to(tl.float32), x.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a.to(x.dtype), x, acc, input_precision="ieee")
    return acc


def _acc_dot(a, x, acc, SPLIT: tl.constexpr, UPCAST: tl.constexpr):
    if SPLIT:
        # x == hi + mid + lo exactly: each bf16 rounding leaves an fp32-exact residual.
        hi = x.to(tl.bfloat16)
        r1 = x - hi.to(tl.float32)
        mid = r1.to(tl.bfloat16)
        lo = (r1 - mid.to(tl.float32)).to(tl.bfloat16)
        acc = _dot(a, hi, acc, UPCAST)
        acc = _dot(a, mid, acc, UPCAST)
        acc = _dot(a, lo, acc, UPCAST)
    else:
        acc = _dot(a, x, acc, UPCAST)
    return acc


def _sketch_kernel(g_ptr, part_ptr, scr_ptr, n, offset, b0, b1, span, pkey_lo, pkey_hi, thr, k, nr,
                   BLOCK: tl.constexpr, ROWS: tl.constexpr, T: tl.constexpr, W: tl.constexpr,
                   SPLIT: tl.constexpr, UPCAST: tl.constexpr):
    p = tl.program_id(0)
    m = tl.program_id(1)
    # pkey arrives as two 32-bit halves so that its Triton arg type never depends on bit 63.
    pk = (pkey_hi.to(tl.uint64) << 32) | pkey_lo.to(tl.uint64)
    thr_u = thr.to(tl.uint64)
    ku = k.to(tl.uint64)
    lane = tl.arange(0, W)
    rows = tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    row0 = m * ROWS
    scr = scr_ptr + (p * tl.num_programs(1) + m).to(tl.int64) * W
    acc = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
    start = b0.to(tl.int64) + p.to(tl.int64) * span
    stop = tl.minimum(start + span, b1.to(tl.int64) + 1)
    for w0 in range(start, stop, W):
        # Which blocks of this window are kept and touch rows [row0, row0+ROWS)?
        b = w0 + lane
        h = _mix64(pk + b.to(tl.uint64) * 0x9E3779B97F4A7C15)
        q = ((((h & 0x7FFFFFFF) * ku) >> 31).to(tl.int32)) // BLOCK
        q2 = tl.where(q + 1 == nr, 0, q + 1)
        mine = ((q >= row0) & (q < row0 + ROWS)) | ((q2 >= row0) & (q2 < row0 + ROWS))
        rel = (b < stop) & ((h >> 32) < thr_u) & mine
        # Compact: list the relevant window indices in increasing order in this program's
        # scratch row (exclusive prefix sum = slot), then read them back T at a time.
        rel_i = rel.to(tl.int32)
        slot = tl.cumsum(rel_i, axis=0) - rel_i
        cnt = tl.sum(rel_i, axis=0)
        tl.debug_barrier()  # every thread is done reading the previous window's list
        tl.store(scr + slot, lane, mask=rel)
        tl.debug_barrier()  # this window's list is visible to all threads (bar.sync)
        for i in range(0, tl.cdiv(cnt, T)):
            s_t = i * T + tl.arange(0, T)
            ok = s_t < cnt  # slots past the count are padding: no load, zero weight
            li = tl.load(scr + s_t, mask=ok, other=0)
            bt = w0 + li.to(tl.int64)
            ht = _mix64(pk + bt.to(tl.uint64) * 0x9E3779B97F4A7C15)
            o = (((ht & 0x7FFFFFFF) * ku) >> 31).to(tl.int32)
            qt = o // BLOCK
            rt = o % BLOCK
            qt2 = tl.where(qt + 1 == nr, 0, qt + 1)
            sgn = tl.where(((ht >> 31) & 1) == 1, 1.0, -1.0)
            # Lane j of block t holds coordinate (j - r_t) mod BLOCK of that block.
            c = (cols[None, :] - rt[:, None] + BLOCK) % BLOCK
            idx = bt[:, None] * BLOCK + c - offset
            gt = tl.load(g_ptr + idx, mask=ok[:, None] & (idx >= 0) & (idx < n), other=0.0)
            upper = cols[None, :] >= rt[:, None]  # lanes that land in row q (else row q+1)
            g1 = tl.where(upper, gt, tl.zeros_like(gt))
            g2 = tl.where(upper, tl.zeros_like(gt), gt)
            a1 = tl.where((rows[:, None] == (qt - row0)[None, :]) & ok[None, :], sgn[None, :], 0.0)
            a2 = tl.where((rows[:, None] == (qt2 - row0)[None, :]) & ok[None, :], sgn[None, :], 0.0)
            acc = _acc_dot(a1, g1, acc, SPLIT, UPCAST)
            acc = _acc_dot(a2, g2, acc, SPLIT, UPCAST)
    out = part_ptr + p.to(tl.int64) * k + (row0 + rows)[:, None] * BLOCK + cols[None, :]
    tl.store(out, acc, mask=(row0 + rows)[:, None] < nr)


def _reduce_kernel(part_ptr, z_ptr, nparts, k, scale, RB: tl.constexpr):
    # z += scale * sum_p partials[p], summed in p order: the fixed order makes it repeatable.
    offs = tl.program_id(0) * RB + tl.arange(0, RB)
    mask = offs < k
    acc = tl.zeros([RB], dtype=tl.float32)
    for p in range(0, nparts):
        acc += tl.load(part_ptr + p * k + offs, mask=mask, other=0.0)
    z = tl.load(z_ptr + offs, mask=mask, other=0.0)
    tl.store(z_ptr + offs, z + scale * acc, mask=mask)


def _load() -> dict[str, Any]:
    """Import triton and decorate the kernels; again whenever TRITON_INTERPRET flips
    (`triton.jit` reads it at decoration, and tests may set it after an earlier use)."""
    mode = _interpret()
    if _kernels.get("interpret") == mode:
        return _kernels
    try:
        import triton
        import triton.language as language
    except ImportError as e:
        raise RuntimeError("the GPU sketch needs triton: pip install 'cropi[gpu]'") from e
    global tl
    tl = language
    # Kernels resolve helpers from the module globals when compiled: rebind them.
    for name in ("_mix64", "_dot", "_acc_dot"):
        globals()[name] = triton.jit(_PLAIN.setdefault(name, globals()[name]))
    ints = ["n", "offset", "b0", "b1", "span", "pkey_lo", "pkey_hi", "thr", "k", "nr"]
    _kernels["sketch"] = triton.jit(_sketch_kernel, do_not_specialize=ints)
    _kernels["reduce"] = triton.jit(_reduce_kernel, do_not_specialize=["nparts", "k"])
    _kernels["interpret"] = mode
    return _kernels


def sketch_into(g: torch.Tensor, offset: int, pkey: int, thr: int, k: int, block: int, scale: float,
                z: torch.Tensor, *, precision: str = "split") -> None:
    """Add the sketch of the flat chunk `g` (coordinates `offset ..` of the parameter with
    key `pkey`) times `scale` into `z` (fp32 [k], same device as `g`). `thr` is the keep
    threshold (2^32: every block). `precision` ("split" or "ieee") matters for fp32 only."""
    kern = _load()
    offset, pkey, thr, k, block = int(offset), int(pkey) & ((1 << 64) - 1), int(thr), int(k), int(block)
    if not supported(k, block):
        raise ValueError(f"sketch_triton needs block a power of two >= 16 dividing k; got k={k}, block={block}")
    if g.dtype not in _DTYPES or g.dim() != 1 or not g.is_contiguous():
        raise ValueError(f"g must be a contiguous 1-D fp32/bf16/fp16 tensor, got {g.dtype} {tuple(g.shape)}")
    if z.dtype != torch.float32 or z.shape != (k,) or not z.is_contiguous() or z.device != g.device:
        raise ValueError(f"z must be a contiguous fp32 [{k}] tensor on {g.device}")
    if precision not in ("split", "ieee") or offset < 0 or not 0 <= thr <= 1 << 32:
        raise ValueError(f"bad precision/offset/thr: {precision!r}, {offset}, {thr}")
    if (n := g.numel()) == 0 or thr == 0:  # nothing, or no block kept
        return
    from triton import cdiv, next_power_of_2 as next_pow2
    nr = k // block
    b0, b1 = offset // block, (offset + n - 1) // block
    nb = b1 - b0 + 1
    # Row tiles: FLOPs are 4*ROWS per coordinate, but each tile re-hashes every window.
    rows = max(16, min(64, next_pow2(cdiv(nr, 4))))
    m_tiles = cdiv(nr, rows)
    # Block ranges: enough programs to fill a GPU (~512 with the row tiles), few enough
    # that the partials (8*P*k bytes, write + read) stay under 1/_READS_PER_PARTIAL of g's reads.
    reads = thr / (1 << 32) * n * g.element_size()
    nprog = max(1, min(_MAX_PROGRAMS, cdiv(512, m_tiles), int(reads / (_READS_PER_PARTIAL * 8 * k))))
    # Window: about 8 tiles of relevant blocks (few half-empty tiles), within a program's range.
    per_block = (thr / (1 << 32)) * min(1.0, (rows + 1) / nr)
    w = min(max(256, next_pow2(int(8 * _T / per_block))), 2048)
    w = max(_T, min(w, next_pow2(cdiv(nb, nprog))))
    span = cdiv(cdiv(nb, nprog), w) * w  # whole windows per program
    nprog = cdiv(nb, span)
    parts = torch.empty((nprog, k), dtype=torch.float32, device=g.device)
    scratch = torch.empty((nprog * m_tiles, w), dtype=torch.int32, device=g.device)
    split = g.dtype == torch.float32 and precision == "split"
    upcast = _interpret() and (split or g.dtype == torch.bfloat16)
    with torch.cuda.device(g.device) if g.is_cuda else contextlib.nullcontext():
        kern["sketch"][(nprog, m_tiles)](
            g, parts, scratch, n, offset, b0, b1, span, pkey & 0xFFFFFFFF, pkey >> 32, thr, k, nr,
            BLOCK=block, ROWS=rows, T=_T, W=w, SPLIT=split, UPCAST=upcast)
        kern["reduce"][(cdiv(k, _RB),)](parts, z, nprog, k, float(scale), RB=_RB)
