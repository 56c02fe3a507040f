"""The sparse projection of docs/design.md §2.3: deterministic everywhere, streaming,
unbiased, and agreeing with a plain torch reference."""

from __future__ import annotations

import hashlib
import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from cropi.influence._kernels import GOLDEN, mix64_py
from cropi.influence.projection import DenseGaussianProjector, SparseProjector, name_hash

from .projection_reference import _project_torch


def _params(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shapes = {
        "model.embed.weight": (97, 130),
        "model.layers.0.attn.q.weight": (64, 64),
        "model.layers.0.attn.q.bias": (64,),
        "model.layers.0.mlp.up.weight": (3, 1000),
        "model.norm.weight": (7,),
        "lm_head.weight": (20001,),
    }
    return {name: torch.randn(shape, generator=gen) for name, shape in shapes.items()}


def _bytes(z: torch.Tensor) -> bytes:
    assert z.dtype == torch.float32 and z.dim() == 1
    return z.numpy().tobytes()


# --- determinism -------------------------------------------------------------


def test_hash_building_blocks_are_the_published_ones():
    # splitmix64's first output from state 0 is 0xE220A8397B1DCDAF.
    assert mix64_py(GOLDEN) == 0xE220A8397B1DCDAF
    # A stable name hash (blake2b), not Python's per-process salted hash().
    assert name_hash("lm_head.weight") == name_hash("lm_head.weight") != name_hash("lm_head.bias")
    assert 0 <= name_hash("x") < 2**64


def test_golden_projection_is_the_same_on_every_machine():
    """Integer inputs and sparse_ratio 1/4 (scale exactly 2) make every fp32
    operation exact, so this digest pins the hash scheme across platforms;
    changing it means bumping HASH_VERSION."""
    proj = SparseProjector(256, 0.25, seed=123, block=16)
    named = [("w", torch.arange(-3000, 3000, dtype=torch.float32) % 17), ("b", torch.ones(100))]
    digest = hashlib.sha256(_bytes(proj.project_flat(named))).hexdigest()
    assert digest == GOLDEN_DIGEST


GOLDEN_DIGEST = "971158254a352c7b610f6caf065beb8b7c7649be73d9e4ec4039b9195a8b0892"


def test_two_processes_give_the_same_bytes():
    script = textwrap.dedent(
        """
        import sys, torch
        from cropi.influence.projection import SparseProjector
        sys.path.insert(0, '.')
        from tests.test_projection import _params
        z = SparseProjector(1024, 0.3, seed=7, block=64).project_flat(_params(3).items())
        sys.stdout.write(z.numpy().tobytes().hex())
        """
    )
    here = SparseProjector(1024, 0.3, seed=7, block=64).project_flat(_params(3).items())
    outs = [
        subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
        for _ in range(2)
    ]
    assert outs[0] == outs[1] == _bytes(here).hex()


def test_parameter_order_does_not_change_a_bit():
    proj = SparseProjector(512, 0.2, seed=1, block=64)
    params = list(_params().items())
    ref = _bytes(proj.project_flat(params))
    rng = np.random.default_rng(0)
    for _ in range(3):
        order = rng.permutation(len(params))
        assert _bytes(proj.project_flat([params[i] for i in order])) == ref


@pytest.mark.parametrize("block", [1, 7, 64, 512])
def test_chunking_does_not_change_a_bit(block):
    proj = SparseProjector(512, 0.3, seed=2, block=block)
    params = _params()
    ref = _bytes(proj.project_flat(params.items()))
    rng = np.random.default_rng(block)
    for _ in range(4):
        acc = proj.new_accumulator()
        for name in rng.permutation(list(params)):
            flat = params[name].reshape(-1)
            cuts = sorted(set(rng.integers(0, flat.numel(), size=rng.integers(0, 6)).tolist()) | {0, flat.numel()})
            for a, b in zip(cuts, cuts[1:]):  # arbitrary cuts, most of them inside a block
                acc.add(name, flat[a:b], offset=a)
        assert _bytes(acc.result()) == ref


def test_chunks_may_interleave_across_parameters_and_gaps_are_zeros():
    proj = SparseProjector(256, 0.5, seed=3, block=16)
    a, b = torch.randn(1000), torch.randn(300)
    acc = proj.new_accumulator()
    acc.add("a", a[:333], 0)
    acc.add("b", b[:100], 0)
    acc.add("a", a[333:], 333)
    acc.add("b", b[200:], 200)  # coordinates 100..199 of b never arrive
    gapped = b.clone()
    gapped[100:200] = 0
    assert _bytes(acc.result()) == _bytes(proj.project_flat([("a", a), ("b", gapped)]))


def test_chunks_out_of_order_are_refused():
    acc = SparseProjector(64, 0.5, seed=0).new_accumulator()
    acc.add("w", torch.ones(100), offset=100)
    with pytest.raises(ValueError, match="increasing, non-overlapping offset order"):
        acc.add("w", torch.ones(10), offset=0)
    with pytest.raises(ValueError, match="increasing, non-overlapping offset order"):
        acc.add("w", torch.ones(10), offset=150)


def test_dtypes_layouts_and_big_pieces_match_the_fp32_contiguous_input(monkeypatch):
    import cropi.influence.accumulators as mod

    monkeypatch.setattr(mod, "_PIECE", 1000)  # force the piecewise conversion path
    proj = SparseProjector(512, 0.4, seed=4, block=32)
    base = torch.randn(300, 70)
    half = base.to(torch.float16)
    cases = {
        "fp16": (half, half.float()),
        "bf16": (base.to(torch.bfloat16), base.to(torch.bfloat16).float()),
        "transposed": (base.t(), base.t().contiguous()),
        "transposed_fp16": (half.t(), half.t().float().contiguous()),
        "strided_1d": (base.reshape(-1)[::3], base.reshape(-1)[::3].contiguous()),
        "3d_long_rows": (torch.randn(2, 3, 900).transpose(1, 2), None),
        "scalar": (torch.tensor(2.5), torch.tensor([2.5])),
        "requires_grad": (base.clone().requires_grad_(True), base),
    }
    for label, (given, expected) in cases.items():
        if expected is None:
            expected = given.contiguous()
        got = proj.project_flat([("p", given)])
        assert _bytes(got) == _bytes(proj.project_flat([("p", expected)])), label


# --- against the reference -----------------------------------------------------


@pytest.mark.parametrize(("k", "ratio", "block"), [(512, 0.1, 64), (256, 1.0, 1), (1000, 0.37, 13), (128, 0.5, 128)])
def test_numba_kernel_matches_the_torch_reference(k, ratio, block):
    proj = SparseProjector(k, ratio, seed=11, block=block)
    params = _params(5)
    got = proj.project_flat(params.items())
    ref = _project_torch(proj, params.items())
    norm = math.sqrt(sum(float(t.square().sum()) for t in params.values()))
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5 * norm)
    assert got.abs().sum() > 0


def test_sparse_ratio_one_keeps_every_block_and_the_keep_rate_is_the_ratio():
    """A one-hot vector at coordinate b*block lands, with weight +-scale, in
    exactly one bucket iff its block is kept."""

    def survivors(proj: SparseProjector, blocks: int) -> list[torch.Tensor]:
        out = []
        for b in range(blocks):
            acc = proj.new_accumulator()
            acc.add("w", torch.ones(1), offset=b * proj.block + 5)
            out.append(acc.result())
        return out

    for z in survivors(SparseProjector(128, 1.0, seed=9, block=64), 300):
        assert int((z != 0).sum()) == 1 and float(z.abs().sum()) == 1.0
    n = 3000
    zs = survivors(SparseProjector(128, 0.1, seed=9, block=64), n)
    kept = [z for z in zs if bool((z != 0).any())]
    assert abs(len(kept) / n - 0.1) < 4 * math.sqrt(0.1 * 0.9 / n)
    for z in kept:
        assert int((z != 0).sum()) == 1 and math.isclose(float(z.abs().sum()), math.sqrt(10), rel_tol=1e-6)


def test_different_seeds_give_unrelated_projections():
    g = torch.randn(200_000)
    a = SparseProjector(4096, 0.5, seed=0).project_flat([("w", g)])
    b = SparseProjector(4096, 0.5, seed=1).project_flat([("w", g)])
    c = SparseProjector(4096, 0.5, seed=0).project_flat([("v", g)])  # the name is part of the hash
    assert not torch.equal(a, b) and not torch.equal(a, c)
    for x, y in ((a, b), (a, c)):
        assert abs(float(torch.nn.functional.cosine_similarity(x, y, dim=0))) < 0.1


# --- statistics ------------------------------------------------------------------


def _unit_pair(d: int, cos: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(d, generator=gen, dtype=torch.float64)
    u = torch.randn(d, generator=gen, dtype=torch.float64)
    g /= g.norm()
    u -= (u @ g) * g
    u /= u.norm()
    return g, cos * g + math.sqrt(1 - cos**2) * u


def _predicted_std(g: torch.Tensor, h: torch.Tensor, k: int, ratio: float, block: int) -> float:
    collisions = (float(g @ g) * float(h @ h) + float(g @ h) ** 2) / k
    per_block = (g * h).reshape(-1, block).sum(dim=1)
    subsampling = (1 - ratio) / ratio * float(per_block.square().sum())
    return math.sqrt(collisions + subsampling)


@pytest.mark.parametrize("k", [8192, 2048])
def test_inner_products_and_norms_are_preserved(k):
    """Unit vectors g, h in R^d (d = 2^21) with <g,h> = c, projected with S
    seeds. For a CountSketch-like sketch subsampled at ratio r,
        Var[<Pg,Ph>] ~ (|g|^2 |h|^2 + <g,h>^2) / k
                       + (1-r)/r * sum_blocks (sum_{i in block} g_i h_i)^2,
    the first term ~ (1 + c^2)/k, the second ~ (1-r)/r * (1 + B c^2)/d for
    random vectors (B = block; it is the price of one keep decision per
    block). Asserted: the empirical std over the seeds is within
    [0.6, 1.6] x that prediction, and the mean error within 4 standard
    errors of 0. Norms: the same with h = g."""
    d, ratio, block, seeds = 1 << 21, 0.1, 64, 40
    for cos in (0.0, 0.5, 0.9, 1.0):
        g, h = _unit_pair(d, cos, seed=int(cos * 10))
        g32, h32 = g.float(), h.float()
        errors = []
        for seed in range(seeds):
            proj = SparseProjector(k, ratio, seed=seed, block=block)
            zg = proj.project_flat([("w", g32)]).double()
            zh = zg if cos == 1.0 else proj.project_flat([("w", h32)]).double()
            errors.append(float(zg @ zh) - float(g @ h))
        errors_t = torch.tensor(errors, dtype=torch.float64)
        predicted = _predicted_std(g, h, k, ratio, block)
        ratio_std = float(errors_t.std()) / predicted
        assert 0.6 < ratio_std < 1.6, (cos, ratio_std)
        assert abs(float(errors_t.mean())) < 4 * predicted / math.sqrt(seeds), (cos, float(errors_t.mean()))


def test_dense_gaussian_reference_is_seeded_and_unbiased():
    d, k = 4000, 256
    g, h = _unit_pair(d, 0.6, seed=1)
    a = DenseGaussianProjector(k, d, seed=3)
    assert torch.equal(a.project(g), DenseGaussianProjector(k, d, seed=3).project(g))
    errors = torch.tensor(
        [float(p.project(g) @ p.project(h)) - 0.6 for p in (DenseGaussianProjector(k, d, seed=s) for s in range(30))]
    )
    predicted = math.sqrt((1 + 0.36) / k)
    assert 0.6 < float(errors.std()) / predicted < 1.6
    assert abs(float(errors.mean())) < 4 * predicted / math.sqrt(30)
    with pytest.raises(ValueError, match="expected a vector of 4000"):
        a.project(torch.ones(10))


# --- validation -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dim": 0}, "dim must be a positive integer"),
        ({"dim": -5}, "dim must be a positive integer"),
        ({"dim": 8.0}, "dim must be a positive integer"),
        ({"sparse_ratio": 0.0}, r"sparse_ratio must be in \(0, 1\]"),
        ({"sparse_ratio": 1.5}, r"sparse_ratio must be in \(0, 1\]"),
        ({"sparse_ratio": -0.1}, r"sparse_ratio must be in \(0, 1\]"),
        ({"sparse_ratio": float("nan")}, r"sparse_ratio must be in \(0, 1\]"),
        ({"block": 0}, "block must be a positive integer"),
        ({"block": -1}, "block must be a positive integer"),
        ({"block": 1024}, r"block \(1024\) must not exceed the projection dim \(512\)"),
        ({"seed": "0"}, "seed must be an integer"),
    ],
)
def test_bad_arguments_are_refused_with_a_clear_message(kwargs, message):
    args = {"dim": 512, "sparse_ratio": 0.1, "seed": 0, "block": 64} | kwargs
    with pytest.raises(ValueError, match=message):
        SparseProjector(**args)


def test_bad_chunks_are_refused():
    acc = SparseProjector(64, 0.5, seed=0).new_accumulator()
    with pytest.raises(ValueError, match="offset must be a non-negative integer"):
        acc.add("w", torch.ones(3), offset=-1)
    with pytest.raises(ValueError, match="must be floating point"):
        acc.add("w", torch.ones(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="must be a torch.Tensor"):
        acc.add("w", np.ones(3))


def test_result_is_fp32_k_and_does_not_consume_the_accumulator():
    proj = SparseProjector(300, 0.5, seed=0, block=10)
    acc = proj.new_accumulator()
    assert torch.equal(acc.result(), torch.zeros(300))
    acc.add("w", torch.randn(1000))
    first = acc.result()
    assert first.dtype == torch.float32 and first.shape == (300,)
    assert torch.equal(acc.result(), first)
    assert acc.names == ["w"]
    assert proj.describe() == {
        "kind": "block_shifted_sketch",
        "hash_version": 1,
        "dim": 300,
        "sparse_ratio": 0.5,
        "seed": 0,
        "block": 10,
    }


# --- segments, threads and batches ----------------------------------------------


@pytest.mark.parametrize("ratio", [1.0, 0.3])
def test_segments_threads_and_chunking_do_not_change_a_bit(ratio):
    """A long parameter is sketched in fixed segments (here 256 coordinates), whole ones in
    parallel: the bytes are the same for any chunking and any number of threads."""
    import numba

    proj = SparseProjector(512, ratio, seed=5, block=16, segment=256)
    g = torch.randn(256 * 9 + 77, generator=torch.Generator().manual_seed(0))
    ref = _bytes(proj.project_flat([("w", g)]))
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        assert _bytes(proj.project_flat([("w", g)])) == ref
    finally:
        numba.set_num_threads(before)
    rng = np.random.default_rng(1)
    for _ in range(4):
        acc = proj.new_accumulator()
        cuts = sorted(set(rng.integers(0, g.numel(), size=5).tolist()) | {0, 512, 1024 + 16, g.numel()})
        for a, b in zip(cuts, cuts[1:]):
            acc.add("w", g[a:b], offset=a)
        assert _bytes(acc.result()) == ref
    norm = float(g.norm())
    assert torch.allclose(proj.project_flat([("w", g)]), _project_torch(proj, [("w", g)]), atol=1e-5 * norm)


def test_a_batch_of_gradients_gives_each_row_what_its_own_accumulator_gives():
    proj = SparseProjector(256, 0.5, seed=9, block=16, segment=512)
    gen = torch.Generator().manual_seed(2)
    grads = {"small": torch.randn(3, 40, 7, generator=gen), "long": torch.randn(3, 2000, generator=gen),
             "bf16": torch.randn(3, 100, generator=gen).to(torch.bfloat16)}
    batch = proj.new_batch(3)
    for name, g in grads.items():
        batch.add(name, g)
    rows = batch.results()
    for r in range(3):
        assert _bytes(rows[r]) == _bytes(proj.project_flat([(name, g[r]) for name, g in grads.items()]))
    with pytest.raises(ValueError, match="added twice"):
        batch.add("small", grads["small"])
    with pytest.raises(ValueError, match="2 rows, expected 3"):
        batch.add("other", torch.ones(2, 5))
