"""`cropi bench pool`: does the projection pool scale with its actors?

One tiny job's offline trajectories are sampled once into a scratch store.
Then the same stage-sized work, every pool part of a stage, is projected by a
1-actor pool and by an `actors`-actor pool (one thread per actor). Each run
gets its own stage (the base model's checkpoint stored under it), so no run
finds the previous run's parts stored and skips them.

The timed window starts once every actor has loaded the stage (model, offline
trajectories, compiled kernel); the start-up (actor creation plus that load)
is reported beside it. Goal from the issue: `speedup` (parts/s of the big
pool over the 1-actor pool) >= 1.7 with 2 actors, i.e. a parallel efficiency
(`speedup / actors`) of at least 0.85, which is the goal for other sizes too.
The machine should be otherwise idle with at least `actors` cores: on a busy
one the figure measures the neighbours.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

GOAL_EFFICIENCY = 0.85  # 1.7x with 2 actors
JOB = "pool-bench"


def _bench_spec(model: str, pool_size: int, n_pool: int, max_new_tokens: int, proj_dim: int):
    from cropi.spec import parse_spec

    return parse_spec({
        "name": JOB,
        "model": {"path": model},
        "data": {"pool": {"source": "builtin:arith", "size": pool_size},
                 "validation": [{"name": "add2", "source": "builtin:arith?skills=add&digits=2", "size": 16}]},
        "rollout": {"max_new_tokens": max_new_tokens},
        # Temperature 1: more prompts with mixed rewards, i.e. with a gradient to project.
        "offline": {"n_pool": n_pool, "n_valid": n_pool, "temperature": 1.0},
        "influence": {"proj_dim": proj_dim},
    })


def _prepare_store(store, spec, runs: int) -> tuple[list[tuple[str, int]], float]:
    """Spec, offline trajectories and a base checkpoint for stages 1..runs; the pool parts and eligible share."""
    from cropi.curriculum import layout
    from cropi.curriculum.influence import POOL, InfluenceEngine
    from cropi.data.sources import load_job_data
    from cropi.executors.inline import Policy, put_checkpoint

    store.put(layout.spec_key(JOB), spec.to_yaml().encode())
    policy = Policy(spec)
    influence = InfluenceEngine(spec, store)
    influence.collect_offline(policy.engine, load_job_data(spec))
    for stage in range(1, runs + 1):
        put_checkpoint(store, layout.checkpoint_prefix(JOB, stage), policy)
    groups = influence.offline[POOL]
    eligible = sum(g.eligible for g in groups) / max(1, len(groups))
    return [p for p in influence.stage_parts(1) if p[0] == POOL], eligible


def _timed_run(store_url: str, actors: int, stage: int, parts: list[tuple[str, int]]) -> dict:
    from cropi.executors.ray.projection_pool import ProjectionPool

    t0 = time.perf_counter()
    with ProjectionPool(store_url, actors, threads_per_actor=1) as pool:
        pool.prepare(JOB, stage)
        t1 = time.perf_counter()
        summary = pool.project_parts(JOB, stage, parts)
        seconds = time.perf_counter() - t1
    return {"stage": stage, "startup_s": t1 - t0, "seconds": seconds,
            "parts_per_s": len(parts) / seconds, "retried": summary["retried"]}


def run_pool_bench(out_dir: Path, actors: int = 2, *, model: str = "builtin:tiny-arith", pool_size: int = 2048,
                   n_pool: int = 8, max_new_tokens: int = 16, proj_dim: int = 8192) -> dict:
    """Run the benchmark, write `out_dir/pool.json` and return its content (see the module docstring)."""
    import ray

    from cropi.executors.ray.cluster import MIN_LOCAL_CPUS, init_ray, shutdown_ray
    from cropi.runtime.store import LocalStore

    if actors < 2:
        raise ValueError("the pool bench compares 1 actor with more: --actors must be at least 2")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started_ray = not ray.is_initialized()
    init_ray(num_cpus=max(actors, MIN_LOCAL_CPUS, os.cpu_count() or 1))  # a local Ray must fit every actor
    try:
        with tempfile.TemporaryDirectory(prefix="cropi-pool-bench-") as tmp:
            store = LocalStore(tmp)
            spec = _bench_spec(model, pool_size, n_pool, max_new_tokens, proj_dim)
            t0 = time.perf_counter()
            parts, eligible = _prepare_store(store, spec, runs=2)
            offline_s = time.perf_counter() - t0
            runs = {f"actors_{n}": _timed_run(store.url, n, stage, parts)
                    for stage, n in enumerate((1, actors), start=1)}
    finally:
        if started_ray:
            shutdown_ray()
    speedup = runs[f"actors_{actors}"]["parts_per_s"] / runs["actors_1"]["parts_per_s"]
    report = {
        "model": model, "pool_size": pool_size, "n_pool": n_pool, "max_new_tokens": max_new_tokens,
        "proj_dim": proj_dim, "parts": len(parts), "eligible_fraction": eligible, "cores": os.cpu_count(),
        "offline_s": offline_s, "runs": runs, "speedup": speedup, "goal_speedup": GOAL_EFFICIENCY * actors,
        "meets_goal": speedup >= GOAL_EFFICIENCY * actors,
    }
    (out_dir / "pool.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
