"""`cropi bench popi --batched`: batched POPI against the per-prompt loop, on a job's model
and data (default: the demo testbed, `examples/arith.yaml`).

The job's behaviour policy samples its offline groups for the first `prompts` pool prompts
(the job's `offline` settings); the eligible ones are projected at the job's
`influence` settings twice over: one backward per prompt (`batch_tokens` null), and
batched at the job's `influence.batch_tokens` (or `batch_tokens` here). Reported: seconds
per scored prompt of each (best of `repeats`), the throughput ratio, the largest relative
L2 difference of a vector (goal < 1e-5), and whether two batched runs give the same bits.
Both paths round in fp32, so each is also compared with a float64 copy of the model on the
first `reference_prompts` prompts: the fp32 floor that any difference between them sits on.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

GOAL_SPEEDUP = 5.0


def run_batched_popi_bench(job: Path = Path("examples/arith.yaml"), prompts: int = 400, repeats: int = 3,
                           batch_tokens: int | None = None, threads: int | None = None,
                           reference_prompts: int = 64) -> dict:
    import copy

    import torch

    from cropi.curriculum.layout import offline_part_key, offline_prefix
    from cropi.data.sources import load_job_data
    from cropi.influence.offline import collect_offline, load_offline
    from cropi.influence.popi import POPIProjector
    from cropi.influence.projection import SparseProjector
    from cropi.models.loading import load_policy
    from cropi.rollout.hf import HFRolloutEngine
    from cropi.runtime.store import LocalStore
    from cropi.spec import load_spec

    spec = load_spec(job)
    if threads is not None:
        torch.set_num_threads(threads)
    model, tok = load_policy(spec.model.path)
    pool = load_job_data(spec, tok).pool[:prompts]
    off, inf = spec.offline, spec.influence
    with tempfile.TemporaryDirectory(prefix="cropi-bench-popi-") as tmp:
        store = LocalStore(tmp)
        collect_offline(HFRolloutEngine(model, tok), store, lambda i: offline_part_key("bench", "pool", i), "pool",
                        pool, n=off.n_pool, temperature=off.temperature,
                        max_new_tokens=spec.rollout.max_new_tokens, seed=spec.seed)
        groups = [g for g in load_offline(store, offline_prefix("bench", "pool")) if g.eligible]
    projector = SparseProjector(inf.proj_dim, inf.sparse_ratio, inf.seed)
    batched_tokens = batch_tokens or inf.batch_tokens or 4096

    def timed(tokens: int | None, policy=model, subset=groups, repeats=repeats) -> tuple[float, list[np.ndarray]]:
        popi = POPIProjector(policy, projector, tok.pad_token_id, spec.rl.adv_eps, batch_tokens=tokens)
        try:
            popi.project_groups(groups[:8])  # warm-up: kernels compiled, caches touched
            best, outs = float("inf"), []
            for _ in range(repeats):
                start = time.perf_counter()
                outs.append(popi.project_groups(subset).vectors)
                best = min(best, time.perf_counter() - start)
            return best, outs
        finally:
            popi.close()

    loop_s, loop_out = timed(None)
    batched_s, batched_out = timed(batched_tokens)
    rel = _relative(batched_out[0], loop_out[0])
    exact = timed(None, copy.deepcopy(model).double(), groups[:reference_prompts], 1)[1][0]
    floor = {"per_prompt_loop_vs_float64": float(_relative(loop_out[0][:reference_prompts], exact).max()),
             "batched_vs_float64": float(_relative(batched_out[0][:reference_prompts], exact).max())}
    speedup = loop_s / batched_s
    return {
        "job": str(job), "model": spec.model.path, "scored_prompts": len(groups), "responses": off.n_pool,
        "batch_tokens": batched_tokens, "torch_threads": torch.get_num_threads(), "repeats": repeats,
        "per_prompt_loop_ms": 1e3 * loop_s / len(groups), "batched_ms": 1e3 * batched_s / len(groups),
        "speedup": speedup, "max_relative_error": float(rel.max()), **floor,
        "bit_identical_run_to_run": all(np.array_equal(batched_out[0], o) for o in batched_out[1:]),
        "goal_speedup": GOAL_SPEEDUP, "meets_goal": speedup >= GOAL_SPEEDUP and float(rel.max()) < 1e-5,
    }


def _relative(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.linalg.norm(a - b, axis=1) / np.maximum(np.linalg.norm(b, axis=1), 1e-30)
