"""Precision@10 % of the projected selection against the exact one
(docs/design.md §2.3: the measurement that chooses `sparse_ratio` and `k`).

For one model, a pool and a targeted validation set:

1. offline groups are sampled once (temperature 1.0, so that many prompts
   have mixed rewards) and only eligible groups (mixed rewards) are kept;
2. every eligible prompt's exact POPI gradient g(x) is computed with
   `full_flat_gradient` and stored as one fp32 row of an [N, d] matrix;
   the exact target is the mean validation gradient, the exact score
   `cos(g(x), t)`, and the exact selection the top `ceil(select_ratio * N)`;
3. for every (sparse_ratio, k) and projector seed, each stored gradient is
   projected with `SparseProjector.project_flat`, fed as its per-parameter
   pieces (zero-copy views into the row), and scored by cosine against the
   projected target. The projection is linear, so the projected mean
   validation gradient equals the mean of the projected validation
   gradients (up to fp32 rounding); the bench projects the mean once.
   precision = |projected top ∩ exact top| / |exact top|; the Spearman rank
   correlation of projected vs exact scores is recorded too;
4. optionally a dense Gaussian (TRAK-style) projection at small k as a
   reference, when its k x d matrix fits in `dense_max_bytes`.

`recommended` is the cheapest grid setting (smallest `sparse_ratio * k`,
then smaller k, then smaller ratio) whose mean precision is within
`tolerance` of the best mean precision.
"""

from __future__ import annotations

import math
import tempfile
import time

import numpy as np
import torch

from cropi.errors import InputError


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 0..n-1 with ties averaged (as scipy.stats.rankdata, minus one)."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.arange(len(x), dtype=np.float64)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    return (np.bincount(inverse, weights=ranks) / counts)[inverse]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = _ranks(np.asarray(a, np.float64)), _ranks(np.asarray(b, np.float64))
    ra -= ra.mean()
    rb -= rb.mean()
    denom = math.sqrt(float(ra @ ra) * float(rb @ rb))
    return float(ra @ rb / denom) if denom > 0 else float("nan")


def _cosines(vectors: np.ndarray, target: np.ndarray) -> np.ndarray:
    v = vectors.astype(np.float64)
    t = target.astype(np.float64)
    norms = np.linalg.norm(v, axis=1) * np.linalg.norm(t)
    dots = v @ t
    return np.divide(dots, norms, out=np.zeros_like(dots), where=norms > 0)


def _top(scores: np.ndarray, m: int) -> set[int]:
    # Stable descending order: ties are broken by prompt position, deterministically.
    return set(np.argsort(-scores, kind="stable")[:m].tolist())


#: The cheaper-scoring options (`influence.params`, `influence.candidates`) measured at the
#: job defaults k = 8192, sparse_ratio 1.0.
PARAM_OPTIONS = (["last:1"], ["last:2"], ["lm_head.*"])
CANDIDATE_FRACTIONS = (0.25, 0.5, 0.75)


def _scoring_options(model, named, grads: torch.Tensor, target: torch.Tensor, evaluate, exact_top: set[int],
                     m: int, seeds: int, seed: int) -> list[dict]:
    """precision@10 % against the exact full-gradient selection of each cheaper-scoring option.

    `params`: the projection of the selected parameters' part of every exact gradient (what
    POPI computes with `influence.params`). `candidates`: a seeded draw of a fraction of the
    eligible prompts, the top m of them by projected score; at most `fraction * m` of the
    exact top can be among them on average, which is the price of the option."""
    import random

    from cropi.influence.param_subset import select_parameters
    from cropi.influence.projection import SparseProjector

    out = []
    for patterns in PARAM_OPTIONS:
        chosen = select_parameters(model, patterns)
        precisions, rhos = [], []
        for s in range(seeds):
            proj = SparseProjector(dim=8192, sparse_ratio=1.0, seed=s)
            z = np.stack([proj.project_flat([(n, t) for n, t in named(grads[i]) if n in chosen]).numpy()
                          for i in range(len(grads))])
            zt = proj.project_flat([(n, t) for n, t in named(target) if n in chosen]).numpy()
            p, rho = evaluate(z, zt)
            precisions.append(p)
            rhos.append(rho)
        share = sum(t.numel() for n, t in named(target) if n in chosen) / target.numel()
        out.append({"option": f"params={','.join(patterns)}", "parameter_share": share,
                    "precision_mean": float(np.mean(precisions)), "precision_std": float(np.std(precisions)),
                    "spearman_mean": float(np.mean(rhos))})
    proj = SparseProjector(dim=8192, sparse_ratio=1.0, seed=0)
    z = np.stack([proj.project_flat(named(grads[i])).numpy() for i in range(len(grads))])
    scores = _cosines(z, proj.project_flat(named(target)).numpy())
    for fraction in CANDIDATE_FRACTIONS:
        n = max(m, math.ceil(fraction * len(grads)))
        precisions = []
        for s in range(seeds):
            chosen = random.Random(f"candidates-{seed}-{s}").sample(range(len(grads)), n)
            top = sorted(chosen, key=lambda i: (-scores[i], i))[:m]
            precisions.append(len(set(top) & exact_top) / m)
        out.append({"option": f"candidates={fraction:g} of eligible", "candidates": n,
                    "precision_mean": float(np.mean(precisions)), "precision_std": float(np.std(precisions))})
    return out


def _collect(model_path: str, pool_size: int, valid_size: int, seed: int):
    from cropi.data.arith import generate
    from cropi.influence.offline import collect_offline, load_offline
    from cropi.models.loading import load_policy
    from cropi.rollout.hf import HFRolloutEngine
    from cropi.runtime.store import LocalStore

    model, tok = load_policy(model_path)
    model.eval()
    pool = generate(pool_size, seed=f"precision-{seed}", noise=0.0)
    valid = generate(valid_size, seed=f"precision-valid-{seed}", skills=("add", "mul"), digits=(2,))
    engine = HFRolloutEngine(model, tok)
    with tempfile.TemporaryDirectory(prefix="cropi-precision-") as tmp:
        store = LocalStore(tmp)
        # A private store of this bench alone: one folder per set.
        collect_offline(engine, store, lambda i: f"pool/part-{i:05d}.parquet", "pool", pool, n=8, temperature=1.0,
                        max_new_tokens=8, seed=seed)
        collect_offline(engine, store, lambda i: f"valid/part-{i:05d}.parquet", "valid", valid, n=16,
                        temperature=1.0, max_new_tokens=8, seed=seed)
        pool_groups = [g for g in load_offline(store, "pool/") if g.eligible]
        valid_groups = [g for g in load_offline(store, "valid/") if g.eligible]
    return model, tok, pool_groups, valid_groups


def run_precision_bench(
    model_path: str = "builtin:tiny-arith",
    pool_size: int = 400,
    valid_size: int = 100,
    ratios: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3, 1.0),
    dims: tuple[int, ...] = (512, 2048, 8192, 32768),
    seeds: int = 3,
    select_ratio: float = 0.1,
    seed: int = 0,
    *,
    dense_dims: tuple[int, ...] = (512,),
    dense_max_bytes: int = 3 << 30,
    tolerance: float = 0.02,
    threads: int | None = 1,
) -> dict:
    """See the module docstring. `threads`: torch intra-op threads for the
    run (restored afterwards; None leaves them alone). One thread is the
    default: per-prompt backward passes of a small model gain nothing from
    intra-op parallelism, and on a busy machine spinning OpenMP workers made
    them ~60x slower (0.9 s vs 15 ms per gradient on 2 shared cores)."""
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run(model_path, pool_size, valid_size, ratios, dims, seeds, select_ratio, seed,
                    dense_dims, dense_max_bytes, tolerance)
    finally:
        torch.set_num_threads(old_threads)


def _run(model_path, pool_size, valid_size, ratios, dims, seeds, select_ratio, seed,
         dense_dims, dense_max_bytes, tolerance) -> dict:
    from cropi.influence.popi import full_flat_gradient, popi_loss
    from cropi.influence.projection import DenseGaussianProjector, SparseProjector

    start = time.perf_counter()
    if not 0.0 < select_ratio <= 1.0:
        raise InputError(f"select_ratio must be in (0, 1], got {select_ratio!r}")
    model, tok, pool_groups, valid_groups = _collect(model_path, pool_size, valid_size, seed)
    if len(pool_groups) < 2 or not valid_groups:
        raise InputError(
            f"too few eligible prompts (pool {len(pool_groups)}, valid {len(valid_groups)}): "
            "the model's offline rewards are all equal for almost every prompt"
        )
    t_collect = time.perf_counter() - start

    # Per-parameter layout of one flat row.
    layout: list[tuple[str, torch.Size, int, int]] = []
    offset = 0
    for name, p in model.named_parameters():
        if p.requires_grad:
            layout.append((name, p.shape, offset, p.numel()))
            offset += p.numel()
    d = offset
    pad = tok.pad_token_id

    def gradient_into(group, row: torch.Tensor) -> None:
        named = full_flat_gradient(model, lambda: popi_loss(model, group, pad))
        pieces = dict(named)
        for name, shape, off, n in layout:
            row[off : off + n].copy_(pieces[name].reshape(-1))

    n_pool = len(pool_groups)
    grads = torch.empty(n_pool, d, dtype=torch.float32)
    for i, group in enumerate(pool_groups):
        gradient_into(group, grads[i])
    target_sum = torch.zeros(d, dtype=torch.float64)
    buf = torch.empty(d, dtype=torch.float32)
    for group in valid_groups:
        gradient_into(group, buf)
        target_sum += buf
    target = (target_sum / len(valid_groups)).to(torch.float32)
    del target_sum, buf
    t_grad = time.perf_counter() - start - t_collect

    def named(row: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        return [(name, row[off : off + n].view(shape)) for name, shape, off, n in layout]

    grads_np = grads.numpy()
    exact = _cosines(grads_np, target.numpy())
    m = max(1, math.ceil(select_ratio * n_pool))
    exact_top = _top(exact, m)

    def evaluate(z: np.ndarray, zt: np.ndarray) -> tuple[float, float]:
        scores = _cosines(z, zt)
        return len(_top(scores, m) & exact_top) / m, spearman(scores, exact)

    grid = []
    for ratio in ratios:
        for k in dims:
            precisions, rhos = [], []
            for s in range(seeds):
                proj = SparseProjector(dim=k, sparse_ratio=ratio, seed=s)
                z = np.stack([proj.project_flat(named(grads[i])).numpy() for i in range(n_pool)])
                zt = proj.project_flat(named(target)).numpy()
                p, rho = evaluate(z, zt)
                precisions.append(p)
                rhos.append(rho)
            grid.append({
                "sparse_ratio": float(ratio), "proj_dim": int(k),
                "precision_mean": float(np.mean(precisions)), "precision_std": float(np.std(precisions)),
                "spearman_mean": float(np.mean(rhos)),
            })
    t_sparse = time.perf_counter() - start - t_collect - t_grad

    dense = []
    for k in dense_dims:
        if k * d * 4 > dense_max_bytes:
            dense.append({"proj_dim": int(k), "skipped": f"k x d matrix needs {k * d * 4 / 2**30:.1f} GiB"})
            continue
        precisions, rhos = [], []
        for s in range(seeds):
            proj = DenseGaussianProjector(dim=k, d=d, seed=s)
            z = (grads @ proj.matrix.T).numpy()
            zt = proj.project(target).numpy()
            del proj
            p, rho = evaluate(z, zt)
            precisions.append(p)
            rhos.append(rho)
        dense.append({
            "proj_dim": int(k), "precision_mean": float(np.mean(precisions)),
            "precision_std": float(np.std(precisions)), "spearman_mean": float(np.mean(rhos)),
        })

    options = _scoring_options(model, named, grads, target, evaluate, exact_top, m, seeds, seed)
    t_options = time.perf_counter() - start - t_collect - t_grad - t_sparse

    best = max(row["precision_mean"] for row in grid)
    ok = [row for row in grid if row["precision_mean"] >= best - tolerance]
    pick = min(ok, key=lambda r: (r["sparse_ratio"] * r["proj_dim"], r["proj_dim"], r["sparse_ratio"]))
    return {
        "model": model_path,
        "eligible_pool": n_pool,
        "valid_prompts": len(valid_groups),
        "d": d,
        "select_ratio": select_ratio,
        "selected": m,
        "seeds": seeds,
        "grid": grid,
        "dense_gaussian": dense,
        "recommended": {"sparse_ratio": pick["sparse_ratio"], "proj_dim": pick["proj_dim"]},
        "options": options,
        "timing_s": time.perf_counter() - start,
        "timing_breakdown_s": {"offline": t_collect, "gradients": t_grad, "sparse_grid": t_sparse,
                               "options": t_options},
    }
