"""Numba kernels for the block-shifted sparse sketch (see `projection.py`).

Kept out of `projection.py` so that the hashing constants and the kernel sit
together and the numba cache is keyed on a small, rarely edited file.

All hash arithmetic is done in uint64 (numba mixes int64 and uint64 into
float64, so every constant and cast here is explicit). No `fastmath`: each z
bucket must receive its additions in one fixed order for the results to be
bit-identical. The only parallel kernel, `sketch_segments`, gives every
segment its own partial vector, so threads never share a bucket and the
thread count cannot change a bit.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

# splitmix64 increment and finaliser constants (Steele, Lea & Flood 2014).
GOLDEN = 0x9E3779B97F4A7C15
MIX1 = 0xBF58476D1CE4E5B9
MIX2 = 0x94D049BB133111EB
MASK64 = (1 << 64) - 1

_GOLDEN = np.uint64(GOLDEN)
_MIX1 = np.uint64(MIX1)
_MIX2 = np.uint64(MIX2)
_S30 = np.uint64(30)
_S27 = np.uint64(27)
_S31 = np.uint64(31)
_S32 = np.uint64(32)
_ONE = np.uint64(1)
_LOW31 = np.uint64((1 << 31) - 1)
_ALL = np.uint64(1 << 32)  # a threshold at or above this keeps every block


#: Blocks hashed per window before the kept ones are summed (see below).
WINDOW = 256
#: How many kept blocks ahead the kernel prefetches.
PREFETCH_AHEAD = 4
#: fp32 coordinates per cache line (prefetch stride).
LINE = 16


def mix64_py(x: int) -> int:
    """splitmix64 finaliser on Python ints (same bits as `_mix64`)."""
    x &= MASK64
    x = ((x ^ (x >> 30)) * MIX1) & MASK64
    x = ((x ^ (x >> 27)) * MIX2) & MASK64
    return x ^ (x >> 31)


@njit(cache=True, fastmath=False, inline="always")
def _mix64(x):
    x = (x ^ (x >> _S30)) * _MIX1
    x = (x ^ (x >> _S27)) * _MIX2
    return x ^ (x >> _S31)


@intrinsic
def _prefetch(typingctx, arr, idx):
    """`llvm.prefetch` (read, high locality) of `&arr[idx]`; a hint only."""
    sig = types.void(arr, idx)

    def codegen(context, builder, signature, args):
        aryty = signature.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        ptr = builder.gep(ary.data, [args[1]])
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        # Opaque-pointer LLVM (llvmlite >= 0.45) names it .p0, typed-pointer LLVM .p0i8.
        name = "llvm.prefetch.p0" if str(i8p) == "ptr" else "llvm.prefetch.p0i8"
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]), name)
        builder.call(fn, [builder.bitcast(ptr, i8p), i32(0), i32(3), i32(1)])
        return context.get_dummy_value()

    return sig, codegen


@njit(cache=True, fastmath=False)
def sketch_chunk(g, offset, pkey, thr, k, block, scale, z):
    """Add the sketch of the flat chunk `g` (float32, contiguous) to `z`.

    `g[t]` is coordinate `offset + t` of one parameter whose key is `pkey`.
    Block `b` (coordinates `b*block .. b*block+block-1`) has the hash
    `h = mix64(pkey + b * GOLDEN)`; it is kept iff `h >> 32 < thr`; its sign is
    bit 31 of `h` (set: +scale); its bucket offset is
    `((h & (2^31-1)) * k) >> 31` (multiply-shift range reduction). Coordinate
    `b*block + j` goes to bucket `(o + j) % k`. Requires `block <= k`, so the
    coordinates of one block hit distinct buckets.

    Blocks are handled in windows of WINDOW: first hash them all and list the
    kept ones (branch-free), then add the kept blocks in increasing order,
    prefetching the block PREFETCH_AHEAD places ahead. Kept blocks are
    scattered, so without this the loop waits on one DRAM miss at a time
    (about 4x slower at sparse_ratio 0.1). The order of additions into `z`
    is still coordinate order.
    """
    n = g.shape[0]
    if n == 0:
        return
    ku = np.uint64(k)
    b0 = offset // block
    b1 = (offset + n - 1) // block
    end_chunk = offset + n
    if thr >= _ALL:
        # Every block kept (sparse_ratio 1): blocks are contiguous, so the hardware prefetcher
        # streams `g` and the window bookkeeping below is pure overhead. Same adds, same order.
        for b in range(b0, b1 + 1):
            h = _mix64(pkey + np.uint64(b) * _GOLDEN)
            _add_block(g, offset, n, end_chunk, b, h, ku, block, scale, z)
        return
    kept = np.empty(WINDOW, np.int64)
    hashes = np.empty(WINDOW, np.uint64)
    for w0 in range(b0, b1 + 1, WINDOW):
        w1 = min(w0 + WINDOW, b1 + 1)
        cnt = 0
        for b in range(w0, w1):
            h = _mix64(pkey + np.uint64(b) * _GOLDEN)
            kept[cnt] = b
            hashes[cnt] = h
            cnt += 1 if (h >> _S32) < thr else 0
        for i in range(cnt):
            if i + PREFETCH_AHEAD < cnt:
                pb = max(kept[i + PREFETCH_AHEAD] * block - offset, 0)
                pe = min(pb + block, n)
                for c in range(pb, pe, LINE):
                    _prefetch(g, c)
            _add_block(g, offset, n, end_chunk, kept[i], hashes[i], ku, block, scale, z)


@njit(cache=True, fastmath=False, inline="always")
def _add_block(g, offset, n, end_chunk, b, h, ku, block, scale, z):
    """Add block `b` (hash `h`) of the chunk into its buckets of `z`, in coordinate order."""
    o = ((h & _LOW31) * ku) >> _S31
    s = scale if ((h >> _S31) & _ONE) == _ONE else -scale
    start = max(b * block, offset)
    stop = min((b + 1) * block, end_chunk)
    # Unsigned indices: numba then skips its negative-index
    # wraparound, which otherwise blocks vectorisation of the adds.
    m = np.uint64(stop - start)
    src = np.uint64(start - offset)
    pos = o + np.uint64(start - b * block)
    if pos >= ku:
        pos -= ku
    if pos + m <= ku:
        # The common case: one contiguous slice, so the loop has no wrap to test for.
        for t in range(m):
            z[pos + t] += s * g[src + t]
        return
    first = ku - pos
    # Two contiguous slices instead of a per-element modulo.
    for t in range(first):
        z[pos + t] += s * g[src + t]
    src2 = src + first
    for t in range(m - first):
        z[t] += s * g[src2 + t]


@njit(cache=True, fastmath=False, parallel=True)
def sketch_segments(g, offset, pkey, thr, k, block, scale, parts, segment):
    """Sketch `parts.shape[0]` whole segments of `segment` coordinates, in parallel.

    `g` starts at coordinate `offset` of its parameter, a multiple of `segment`
    (itself a multiple of `block`), and holds `parts.shape[0] * segment`
    coordinates. Row `i` of `parts` (zeros on entry) receives the sketch of
    segment `i` alone, added in coordinate order: the same operations as
    `sketch_chunk` on that segment into a zero vector, whichever thread runs it.
    """
    for i in prange(parts.shape[0]):
        a = i * segment
        sketch_chunk(g[a : a + segment], offset + a, pkey, thr, k, block, scale, parts[i])


@njit(cache=True, fastmath=False, parallel=True)
def sketch_rows(g, offset, pkey, thr, k, block, scale, z):
    """Row `r` of `z` += the sketch of row `r` of `g` (2-D, fp32, C order): one parameter's
    gradients of many prompts, each into its own vector, so threads never share a bucket."""
    for r in prange(g.shape[0]):
        sketch_chunk(g[r], offset, pkey, thr, k, block, scale, z[r])
