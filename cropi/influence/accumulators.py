"""Streaming accumulators of the block-shifted sketch (defined in `projection.py`).

`Accumulator` sketches one gradient as it arrives in `(name, chunk, offset)`
pieces; `BatchAccumulator` sketches the gradients of many prompts side by
side, one parameter at a time. CPU chunks go to the numba kernels
(`_kernels.py`), CUDA chunks to the Triton kernel (`sketch_triton.py`) where
they lie. Every parameter has its own partial vector and the partials are
summed in sorted-name order, so the result does not depend on the order in
which parameters arrive.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Protocol

import numba
import numpy as np
import torch

from cropi.errors import InputError
from cropi.influence._kernels import sketch_chunk, sketch_rows, sketch_segments



class SparseProjector(Protocol):
    """What an accumulator needs of `projection.SparseProjector` (kept as a protocol so that
    this module does not import the one that builds it)."""

    dim: int
    block: int
    threshold: int
    scale: np.float32
    segment: int

    def param_key(self, name: str) -> int: ...

_PIECE = 1 << 20  # conversion buffer, in coordinates (4 MiB fp32)
_PARALLEL_SEGMENTS = 16  # whole segments sketched per parallel call: bounds the extra memory to 16 k-vectors


@contextlib.contextmanager
def _threads():
    """Sketch on as many threads as torch may use here (a Ray actor with one CPU gets one)."""
    before = numba.get_num_threads()
    numba.set_num_threads(max(1, min(numba.config.NUMBA_NUM_THREADS, torch.get_num_threads())))
    try:
        yield
    finally:
        numba.set_num_threads(before)


def _fp32_pieces(t: torch.Tensor, base: int = 0) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield `(flat offset, contiguous fp32 CPU 1-D tensor)` covering `t` in
    row-major order, copying at most `_PIECE` coordinates at a time."""
    n = t.numel()
    if n == 0:
        return
    if t.is_contiguous():
        t = t.view(-1)
        if t.dtype == torch.float32 and t.device.type == "cpu":
            yield base, t
            return
    if n <= _PIECE or t.dim() <= 1:
        flat = t.reshape(-1) if t.dim() != 1 else t
        for a in range(0, n, _PIECE):
            part = flat[a : a + _PIECE]
            buf = torch.empty(part.shape, dtype=torch.float32)
            buf.copy_(part)
            yield base + a, buf
        return
    row = n // t.shape[0]
    if row <= _PIECE:
        step = _PIECE // row
        for a in range(0, t.shape[0], step):
            part = t[a : a + step]
            buf = torch.empty(part.shape, dtype=torch.float32)
            buf.copy_(part)
            yield base + a * row, buf.view(-1)
    else:
        for a in range(t.shape[0]):
            yield from _fp32_pieces(t[a], base + a * row)


def _gpu():
    from cropi.influence import sketch_triton  # imports triton lazily, on first use

    return sketch_triton


def on_device_kernel(grad: torch.Tensor, projector: SparseProjector) -> bool:
    """Is this gradient sketched where it lies, by the GPU kernel? (CUDA, triton installed, and a
    block size the kernel handles; otherwise it is copied to the host in pieces.)"""
    if grad.device.type != "cuda":
        return False
    gpu = _gpu()
    return gpu.available() and gpu.supported(projector.dim, projector.block)


class _HostSketch:
    """The sketch of one parameter's CPU chunks, folded segment by segment.

    Coordinates are grouped into fixed segments (`segment` coordinates, a
    multiple of the block). Each segment is sketched into its own zero vector
    in coordinate order and then added to `z` in segment order, so the result
    depends neither on how the parameter was chunked nor on how many threads
    sketched the whole segments of a big chunk in parallel.
    """

    def __init__(self, projector: SparseProjector, key: int) -> None:
        self.p = projector
        self.key = np.uint64(key)
        self.z: np.ndarray | None = None  # the folded segments; None while the first is still open
        self.open = np.zeros(projector.dim, dtype=np.float32)  # the segment still being filled
        self.open_index = 0

    def _fold(self) -> None:
        if self.z is None:  # 0 + open is open: most parameters never need a second vector
            self.z, self.open = self.open, np.zeros(self.p.dim, dtype=np.float32)
        else:
            self.z += self.open
            self.open[:] = 0.0

    def add(self, g: np.ndarray, offset: int) -> None:
        p, seg = self.p, self.p.segment
        thr = np.uint64(p.threshold)
        i, n = 0, g.shape[0]
        while i < n:
            at = offset + i
            index = at // seg
            if index != self.open_index:
                self._fold()
                self.open_index = index
            whole = (n - i) // seg if at % seg == 0 else 0
            if whole >= 2:
                whole = min(whole, _PARALLEL_SEGMENTS)
                parts = np.zeros((whole, p.dim), dtype=np.float32)
                with _threads():
                    sketch_segments(g[i : i + whole * seg], at, self.key, thr, p.dim, p.block, p.scale, parts, seg)
                for row in parts:  # the same folds as if the segments had come one by one
                    self._fold()
                    self.open = row
                i += whole * seg
                self.open_index = index + whole - 1
                continue
            end = min(n, i + (index + 1) * seg - at)
            sketch_chunk(g[i:end], at, self.key, thr, p.dim, p.block, p.scale, self.open)
            i = end

    def result(self) -> np.ndarray:
        return self.open if self.z is None else self.z + self.open


class Accumulator:
    """Streaming projection of one gradient; see `SparseProjector.new_accumulator`."""

    def __init__(self, projector: SparseProjector) -> None:
        self.projector = projector
        self._sketches: dict[str, _HostSketch] = {}
        self._device: dict[str, torch.Tensor] = {}  # fp32 [k] per parameter, where its gradient lives
        self._next: dict[str, int] = {}

    @property
    def names(self) -> list[str]:
        return sorted([*self._sketches, *self._device])

    def add(self, name: str, grad: torch.Tensor, offset: int = 0) -> None:
        """Add the flat chunk `grad.reshape(-1)` starting at coordinate `offset`
        of parameter `name`. Chunks of one parameter must come in increasing,
        non-overlapping offset order."""
        if not isinstance(name, str):
            raise InputError(f"parameter name must be a str, got {type(name).__name__}")
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise InputError(f"offset must be a non-negative integer, got {offset!r}")
        if not isinstance(grad, torch.Tensor):
            raise InputError(f"gradient of {name!r} must be a torch.Tensor, got {type(grad).__name__}")
        if not grad.is_floating_point():
            raise InputError(f"gradient of {name!r} must be floating point, got {grad.dtype}")
        expected = self._next.get(name, 0)
        if offset < expected:
            raise InputError(
                f"chunks of parameter {name!r} must arrive in increasing, non-overlapping offset order: "
                f"got offset {offset}, but coordinates up to {expected} were already added"
            )
        p = self.projector
        with torch.no_grad():
            if on_device_kernel(grad, p) and name not in self._sketches:
                z = self._device.get(name)
                if z is None:
                    z = self._device[name] = torch.zeros(p.dim, dtype=torch.float32, device=grad.device)
                _gpu().sketch_into(grad.detach().reshape(-1).contiguous(), offset, p.param_key(name), p.threshold,
                                   p.dim, p.block, float(p.scale), z)
            else:
                if name in self._device:
                    raise InputError(f"chunks of parameter {name!r} must all be on one device")
                sketch = self._sketches.get(name)
                if sketch is None:
                    sketch = self._sketches[name] = _HostSketch(p, p.param_key(name))
                for start, piece in _fp32_pieces(grad.detach()):
                    sketch.add(piece.numpy(), offset + start)
        self._next[name] = offset + grad.numel()

    def result(self) -> torch.Tensor:
        """The projection so far: fp32 [k] on the CPU, parameters summed in sorted-name order."""
        out = np.zeros(self.projector.dim, dtype=np.float32)
        device = None
        for name in sorted(self._device):
            device = self._device[name] if device is None else device + self._device[name]
        if device is not None:
            out += device.cpu().numpy()  # one k-vector per prompt crosses to the host
        for name in sorted(self._sketches):
            out += self._sketches[name].result()
        return torch.from_numpy(out)


class BatchAccumulator:
    """`rows` gradients sketched side by side: `add(name, grads)` takes one parameter's
    gradients of every row (`[rows, *shape]`) in one kernel call, which is what makes
    sketching many small per-prompt gradients cheap. Each row's result is bit-identical to
    an `Accumulator` fed that row's gradients whole, one parameter at a time."""

    def __init__(self, projector: SparseProjector, rows: int) -> None:
        self.projector = projector
        self.rows = rows
        # name -> [rows, k] partials (numpy, or torch where the gradient lives on a GPU),
        # or per-row sketches for a parameter longer than a segment
        self._sketches: dict[str, np.ndarray | torch.Tensor | list[_HostSketch]] = {}

    def add(self, name: str, grads: torch.Tensor) -> None:
        p = self.projector
        if grads.shape[0] != self.rows:
            raise InputError(f"gradient batch of {name!r} has {grads.shape[0]} rows, expected {self.rows}")
        if name in self._sketches:
            raise InputError(f"parameter {name!r} was added twice to one batch")
        flat = grads.detach().reshape(self.rows, -1)
        key = p.param_key(name)
        if on_device_kernel(flat, p):
            z = self._sketches[name] = torch.zeros((self.rows, p.dim), dtype=torch.float32, device=flat.device)
            with torch.no_grad():
                for r in range(self.rows):
                    _gpu().sketch_into(flat[r].contiguous(), 0, key, p.threshold, p.dim, p.block, float(p.scale), z[r])
            return
        if flat.shape[1] > p.segment:
            sketches = self._sketches[name] = [_HostSketch(p, key) for _ in range(self.rows)]
            for sketch, row in zip(sketches, flat):
                for start, piece in _fp32_pieces(row):
                    sketch.add(piece.numpy(), start)
            return
        if flat.dtype != torch.float32 or flat.device.type != "cpu" or not flat.is_contiguous():
            flat = flat.to(device="cpu", dtype=torch.float32).contiguous()
        z = self._sketches[name] = np.zeros((self.rows, p.dim), dtype=np.float32)
        with torch.no_grad(), _threads():
            sketch_rows(flat.numpy(), 0, np.uint64(key), np.uint64(p.threshold), p.dim, p.block, p.scale, z)

    def results(self) -> torch.Tensor:
        """fp32 [rows, k]: every row's parameters summed in sorted-name order."""
        out = np.zeros((self.rows, self.projector.dim), dtype=np.float32)
        device = [name for name in sorted(self._sketches) if isinstance(self._sketches[name], torch.Tensor)]
        if device:
            total = self._sketches[device[0]]
            for name in device[1:]:
                total = total + self._sketches[name]
            out += total.cpu().numpy()
        for name in sorted(self._sketches):
            part = self._sketches[name]
            if isinstance(part, torch.Tensor):
                continue
            if isinstance(part, np.ndarray):
                out += part
            else:
                for r, sketch in enumerate(part):
                    out[r] += sketch.result()
        return torch.from_numpy(out)
