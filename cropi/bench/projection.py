"""`cropi bench projection`: how fast is the sparse projection?

Nanoseconds per input coordinate (best of `repeats`) for:

- `cropi`: `SparseProjector` on one fp32 buffer of `dim` coordinates, given as
  one parameter, after the numba kernel is compiled (and again at
  `sparse_ratio=1`, where every coordinate is read);
- `memory_pass`: `torch.sum` over the same buffer, the memory-bandwidth
  yardstick: the faster of torch's default intra-op threads and one thread
  (the projector runs on one thread);
- `sklearn`: `SparseRandomProjection(density='auto').transform` of a
  1 x `sklearn_dim` row (fit excluded), and, with `sklearn_matched`, with
  `density = sparse_ratio / k`, i.e. the same expected nonzeros per input
  coordinate as cropi's sketch;
- `dense`: a dense Gaussian projection (`G @ g`, TRAK-style) at `dense_dim`.

Goals from the issue: `bandwidth_fraction = memory_pass / cropi >= 0.5` and
`speedup_vs_sklearn = sklearn / cropi >= 100`.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch

GOALS = {"bandwidth_fraction": 0.5, "speedup_vs_sklearn": 100.0}


def _best_seconds(fn: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _sklearn_ns(d: int, k: int, density: float | str, repeats: int, seed: int) -> tuple[float, float]:
    from sklearn.random_projection import SparseRandomProjection

    row = np.random.default_rng(seed).standard_normal((1, d), dtype=np.float32)
    srp = SparseRandomProjection(n_components=k, density=density, dense_output=True, random_state=seed)
    srp.fit(row)
    srp.transform(row)
    seconds = _best_seconds(lambda: srp.transform(row), repeats)
    return seconds / d * 1e9, float(srp.density_)


def run_projection_bench(
    dim: int = 50_000_000,
    k: int = 8192,
    sparse_ratio: float = 0.1,
    repeats: int = 5,
    *,
    block: int = 64,
    sklearn_dim: int = 2_000_000,
    dense_dim: int = 25_000,
    seed: int = 0,
) -> dict:
    """Run the benchmark and return the numbers (see the module docstring)."""
    from cropi.influence.projection import DenseGaussianProjector, SparseProjector

    if dim <= 0 or sklearn_dim <= 0 or dense_dim <= 0 or repeats <= 0:
        raise ValueError("dim, sklearn_dim, dense_dim and repeats must be positive")
    gen = torch.Generator().manual_seed(seed)
    buf = torch.randn(dim, generator=gen, dtype=torch.float32)

    def cropi_ns(ratio: float) -> float:
        proj = SparseProjector(k, ratio, seed, block=block)
        proj.project_flat([("w", buf[: min(dim, 4096)])])  # compile / load the kernel

        def once() -> None:
            acc = proj.new_accumulator()
            acc.add("w", buf)
            acc.result()

        return _best_seconds(once, repeats) / dim * 1e9

    cropi = cropi_ns(sparse_ratio)
    cropi_full = cropi_ns(1.0)
    # The yardstick is the faster of torch's default threads and one thread
    # (the projector's), so a busy second core cannot flatter the fraction.
    memory_threads = torch.get_num_threads()
    memory = _best_seconds(lambda: torch.sum(buf), repeats)
    torch.set_num_threads(1)
    try:
        memory = min(memory, _best_seconds(lambda: torch.sum(buf), repeats)) / dim * 1e9
    finally:
        torch.set_num_threads(memory_threads)
    buf = None  # free the big buffer before the sklearn runs

    sklearn_auto, auto_density = _sklearn_ns(sklearn_dim, k, "auto", repeats, seed)
    sklearn_matched, matched_density = _sklearn_ns(sklearn_dim, k, sparse_ratio / k, repeats, seed)

    dense = DenseGaussianProjector(k, dense_dim, seed)
    vec = torch.randn(dense_dim, generator=gen)
    dense.project(vec)
    dense_ns = _best_seconds(lambda: dense.project(vec), repeats) / dense_dim * 1e9
    dense = None

    result = {
        "dim": dim,
        "k": k,
        "sparse_ratio": sparse_ratio,
        "block": block,
        "repeats": repeats,
        "torch_threads": torch.get_num_threads(),
        "cropi_ns_per_coord": cropi,
        "cropi_ratio1_ns_per_coord": cropi_full,
        "memory_pass_ns_per_coord": memory,
        "sklearn_dim": sklearn_dim,
        "sklearn_density": auto_density,
        "sklearn_ns_per_coord": sklearn_auto,
        "sklearn_matched_density": matched_density,
        "sklearn_matched_ns_per_coord": sklearn_matched,
        "dense_dim": dense_dim,
        "dense_ns_per_coord": dense_ns,
        "bandwidth_fraction": memory / cropi,
        "bandwidth_fraction_ratio1": memory / cropi_full,
        "speedup_vs_sklearn": sklearn_auto / cropi,
        "speedup_vs_sklearn_matched": sklearn_matched / cropi,
        "speedup_vs_dense": dense_ns / cropi,
        "goals": dict(GOALS),
    }
    result["meets_goals"] = all(result[key] >= goal for key, goal in GOALS.items())
    return result
