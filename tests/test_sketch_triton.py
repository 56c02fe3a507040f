"""The Triton sketch kernel (`cropi.influence.sketch_triton`) computes the block-shifted
sketch of `projection.py`: the same z as the numba kernel within fp32 rounding,
bit-identical run to run, and it never reads (or adds) an unkept block.

On a CPU machine these run in Triton's interpreter, which must be switched on
(TRITON_INTERPRET=1) before `triton` is first imported. Other tests of the
session may import triton earlier (torch, deepspeed), so unless the variable
was set for the whole process, the direct tests are skipped here and
`test_runs_in_the_triton_interpreter` runs this file in a fresh interpreter
process with it set. With a GPU (and no TRITON_INTERPRET) they run on the GPU.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cropi.influence import sketch_triton
from cropi.influence._kernels import GOLDEN, mix64_py, sketch_chunk

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DIRECT = INTERPRET or torch.cuda.is_available()
DEVICE = "cpu" if INTERPRET or not torch.cuda.is_available() else "cuda"
direct = pytest.mark.skipif(not DIRECT, reason="run by test_runs_in_the_triton_interpreter (fresh process)")

ALL = 1 << 32
BLOCK = 64


def threshold(ratio: float) -> int:
    return min(ALL, max(1, round(ratio * ALL)))  # as SparseProjector.threshold


def reference(g: torch.Tensor, offset: int, pkey: int, thr: int, k: int, block: int = BLOCK) -> np.ndarray:
    """The numba CPU kernel on the fp32 values of `g` (bf16 -> fp32 is exact)."""
    z = np.zeros(k, np.float32)
    scale = np.float32(1.0 / math.sqrt(thr / ALL))
    sketch_chunk(g.float().cpu().numpy(), offset, np.uint64(pkey), np.uint64(thr), k, block, scale, z)
    return z


def triton_sketch(g: torch.Tensor, offset: int, pkey: int, thr: int, k: int, block: int = BLOCK,
                  **kw) -> np.ndarray:
    z = torch.zeros(k, dtype=torch.float32, device=g.device)
    scale = float(np.float32(1.0 / math.sqrt(thr / ALL)))
    sketch_triton.sketch_into(g, offset, pkey, thr, k, block, scale, z, **kw)
    return z.cpu().numpy()


def rel_err(z: np.ndarray, ref: np.ndarray) -> float:
    if not ref.any():
        return float(np.abs(z).max())  # nothing kept: z must be exactly 0
    return float(np.linalg.norm(z.astype(np.float64) - ref) / np.linalg.norm(ref))


def gradient(n: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=gen).to(dtype).to(DEVICE)


KEYS = [0xF1E2D3C4B5A69788, 5]  # bit 63 set, and a small key (different Triton arg types)


@direct
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 63, 64, 1000, 4097, 70_000])
@pytest.mark.parametrize("offset", [0, 37])
@pytest.mark.parametrize("ratio", [1.0, 0.3])
@pytest.mark.parametrize("k", [256, 8192])
def test_equals_the_numba_kernel(dtype, n, offset, ratio, k):
    g = gradient(n, dtype, seed=n + offset)
    pkey, thr = KEYS[n % 2], threshold(ratio)
    assert rel_err(triton_sketch(g, offset, pkey, thr, k), reference(g, offset, pkey, thr, k)) < 1e-5


@direct
@pytest.mark.parametrize(("dtype", "precision"), [(torch.float32, "ieee"), (torch.float16, "split")])
@pytest.mark.parametrize(("n", "k", "block"), [(5000, 8192, 64), (3000, 512, 16), (3000, 1024, 128)])
def test_other_dtypes_precisions_and_blocks_agree_too(dtype, precision, n, k, block):
    g = gradient(n, dtype, seed=1)
    pkey, thr = KEYS[0], threshold(0.5)
    z = triton_sketch(g, 11, pkey, thr, k, block, precision=precision)
    assert rel_err(z, reference(g, 11, pkey, thr, k, block)) < 1e-5


@direct
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [256, 8192, 32768])
def test_many_block_ranges_and_row_tiles_sum_to_the_same_sketch(dtype, k, monkeypatch):
    """Small chunks get one program per row tile; here the partials limit is lifted so that
    many programs (block ranges x row tiles of z) each add their part, reduced in order."""
    monkeypatch.setattr(sketch_triton, "_READS_PER_PARTIAL", 1e-3)
    g = gradient(20_000, dtype, seed=k)
    pkey, thr = KEYS[0], threshold(0.3)
    assert rel_err(triton_sketch(g, 37, pkey, thr, k), reference(g, 37, pkey, thr, k)) < 1e-5


@direct
def test_a_kept_block_is_its_signed_values_rotated_into_z():
    """The definition, spelt out for one block: block b of key pkey has h = mix64(pkey +
    b*GOLDEN); its coordinate j lands in z[(o + j) % k] with sign bit 31 of h, o = ((h mod
    2^31) * k) >> 31; sparse_ratio 1 means scale 1."""
    k, pkey, b = 256, KEYS[0], 3
    g = torch.arange(1, BLOCK + 1, dtype=torch.float32, device=DEVICE)
    z = triton_sketch(g, b * BLOCK, pkey, ALL, k)
    h = mix64_py(pkey + b * GOLDEN)
    o, sign = ((h & (2**31 - 1)) * k) >> 31, 1.0 if h >> 31 & 1 else -1.0
    want = np.zeros(k, np.float32)
    want[(o + np.arange(BLOCK)) % k] = sign * g.cpu().numpy()
    np.testing.assert_array_equal(z, want)


@direct
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bit_identical_run_to_run(dtype):
    g = gradient(70_000, dtype, seed=7)
    runs = [triton_sketch(g, 37, KEYS[0], threshold(0.3), 8192).tobytes() for _ in range(2)]
    assert runs[0] == runs[1]


@direct
def test_unkept_blocks_are_neither_read_nor_added():
    """NaN in every unkept block changes nothing: a value that was loaded at all would
    poison the products (0 * NaN = NaN)."""
    n, offset, k, pkey, thr = 20_000, 37, 8192, KEYS[0], threshold(0.3)
    g = gradient(n, torch.float32, seed=3)
    blocks = (offset + torch.arange(n)) // BLOCK
    kept = torch.tensor([mix64_py(pkey + int(b) * GOLDEN) >> 32 < thr for b in range(blocks.max() + 1)])
    unkept = ~kept[blocks].to(DEVICE)
    assert 0 < unkept.sum() < n
    clean = triton_sketch(g.masked_fill(unkept, 0.0), offset, pkey, thr, k)
    poisoned = triton_sketch(g.masked_fill(unkept, float("nan")), offset, pkey, thr, k)
    assert np.isfinite(poisoned).all()
    np.testing.assert_array_equal(poisoned, clean)


@direct
def test_chunks_starting_mid_block_and_large_offsets_sum_to_the_whole():
    n, k, pkey, thr = 10_000, 8192, KEYS[0], threshold(0.3)
    g = gradient(n, torch.bfloat16, seed=5)
    base = 2**33 + 37  # coordinates and block indices past 2^31
    whole = reference(g, base, pkey, thr, k)
    parts = triton_sketch(g[:4001], base, pkey, thr, k) + triton_sketch(g[4001:], base + 4001, pkey, thr, k)
    assert rel_err(parts, whole) < 1e-5


@direct
def test_adds_into_z_and_checks_its_inputs():
    g = gradient(1000, torch.float32)
    z = torch.ones(256, device=DEVICE)
    sketch_triton.sketch_into(g, 0, 9, ALL, 256, BLOCK, 2.0, z)
    np.testing.assert_allclose(z.cpu().numpy(), 1 + 2 * reference(g, 0, 9, ALL, 256), rtol=1e-5, atol=1e-5)
    assert not sketch_triton.supported(256, 1) and not sketch_triton.supported(200, 64)
    assert sketch_triton.supported(8192, 64) and sketch_triton.supported(32768, 64)
    with pytest.raises(ValueError, match="power of two"):
        sketch_triton.sketch_into(g, 0, 9, ALL, 256, 1, 1.0, z)
    with pytest.raises(ValueError, match="fp32"):
        sketch_triton.sketch_into(g, 0, 9, ALL, 128, BLOCK, 1.0, z)
    with pytest.raises(ValueError, match="1-D"):
        sketch_triton.sketch_into(g.view(10, 100), 0, 9, ALL, 256, BLOCK, 1.0, z)


@direct
def test_the_module_imports_without_triton_and_names_the_extra():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from cropi.influence import sketch_triton as st\n"
        "assert not st.available()\n"
        "try:\n"
        "    st.sketch_into(torch.ones(4), 0, 1, 1 << 32, 256, 64, 1.0, torch.zeros(256))\n"
        "except RuntimeError as e:\n"
        "    assert \"pip install 'cropi[gpu]'\" in str(e), e\n"
        "else:\n"
        "    raise AssertionError('no error')\n"
    )
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]


COMPILE_FOR_GPUS = """
import os
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from cropi.influence import sketch_triton as st

kern = st._load()
ints = dict(n="i64", offset="i64", b0="i64", b1="i64", span="i64", pkey_lo="i64", pkey_hi="i32",
            thr="i64", k="i32", nr="i32")
for arch, gty, rows, split in [(90, "*bf16", 32, False), (90, "*bf16", 64, False), (80, "*fp16", 16, False),
                               (90, "*fp32", 32, True), (80, "*fp32", 32, False)]:
    sig = dict(g_ptr=gty, part_ptr="*fp32", scr_ptr="*i32", **ints)
    const = dict(BLOCK=64, ROWS=rows, T=st._T, W=2048, SPLIT=split, UPCAST=False)
    sig.update({c: "constexpr" for c in const})
    src = ASTSource(fn=kern["sketch"], signature=sig,
                    constexprs={(list(sig).index(c),): v for c, v in const.items()})
    ptx = triton.compile(src, target=GPUTarget("cuda", arch, 32)).asm["ptx"]
    assert ("mma" in ptx) == (gty != "*fp32" or split), (arch, gty, split)  # tensor cores
sig = dict(part_ptr="*fp32", z_ptr="*fp32", nparts="i32", k="i32", scale="fp32", RB="constexpr")
triton.compile(ASTSource(fn=kern["reduce"], signature=sig, constexprs={(5,): st._RB}),
               target=GPUTarget("cuda", 90, 32))
"""


@direct
def test_the_kernels_compile_for_ampere_and_hopper_without_a_gpu():
    """Triton's wheel ships ptxas: the GPU code path (not the interpreter's) is compiled
    to cubin here, so type or shape errors that only the compiler sees fail on CPU too.
    bf16/fp16 and split fp32 tiles use tensor cores (mma); `ieee` fp32 does not."""
    env = {key: v for key, v in os.environ.items() if key != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", COMPILE_FOR_GPUS], cwd=root, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]


@pytest.mark.skipif(DIRECT, reason="already running directly")
def test_runs_in_the_triton_interpreter():
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__).resolve())]
    out = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-3000:]
    # Everything ran there; only this wrapper itself is skipped in the child.
    assert " passed" in out.stdout and re.search(r"\b1 skipped", out.stdout), out.stdout[-3000:]


@direct
def test_accumulators_send_gradients_to_the_gpu_kernel_where_they_lie(monkeypatch):
    """`Accumulator.add` and `BatchAccumulator.add` sketch a CUDA gradient with this kernel and
    no host copy. With no GPU here, the CUDA check is replaced so that the interpreter's CPU
    tensors take that path; the result must equal the numba path's within fp32 rounding."""
    from cropi.influence import accumulators
    from cropi.influence.projection import SparseProjector

    proj = SparseProjector(512, 1.0, seed=3, block=64)
    params = {"a.weight": gradient(3000, torch.bfloat16, 1), "b.weight": gradient(700, torch.float32, 2)}
    host = proj.project_flat(params.items()).numpy()
    batch_host = proj.new_batch(2)
    for name, g in params.items():
        batch_host.add(name, torch.stack([g, -g]))
    calls = []
    monkeypatch.setattr(accumulators, "on_device_kernel", lambda grad, p: calls.append(grad.dtype) or True)
    monkeypatch.setattr(accumulators, "_fp32_pieces", lambda *a: pytest.fail("copied to the host"))
    device = proj.project_flat(params.items()).numpy()
    assert rel_err(device, host) < 1e-5 and len(calls) == 2
    batch = proj.new_batch(2)
    for name, g in params.items():
        batch.add(name, torch.stack([g, -g]))
    rows, rows_host = batch.results().numpy(), batch_host.results().numpy()
    assert max(rel_err(rows[r], rows_host[r]) for r in range(2)) < 1e-5
