"""`cropi bench grpo`: does plain GRPO improve the warm-started policy?

For each seed, evaluate the base policy on the targeted validation sets, run
N GRPO steps over the whole pool, evaluate again. The gain is the difference
of the seed means, reported with the per-seed values so the spread is visible.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from rich.console import Console

from cropi.embedded import run_job
from cropi.errors import InputError
from cropi.evaluation import targeted_mean
from cropi.spec import load_spec

METRICS = ("accuracy", "sampled_accuracy")  # greedy, and avg@k at the rollout temperature


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def run_grpo_bench(job: Path, steps: int, seeds: int, out: Path, console: Console) -> dict:
    base = load_spec(job)
    if not base.data.validation:
        raise InputError(f"{job}: data.validation is empty; the benchmark measures targeted validation accuracy")
    per_seed = []
    for seed in range(seeds):
        spec = base.model_copy(deep=True)
        spec.seed = seed
        spec.name = f"{base.name}-grpo-seed{seed}"
        spec.curriculum.selector = "full"
        spec.curriculum.stages = 1
        spec.curriculum.steps_per_stage = steps
        spec.eval.every = max(1, steps // 4)
        spec.eval.samples = max(spec.eval.samples, 1)
        console.print(f"[bold]seed {seed}[/]: {steps} GRPO steps")
        result = run_job(spec, out / f"seed-{seed}", console)
        row = {"seed": seed, "per_set_before": result.before, "per_set_after": result.after,
               "wallclock_s": result.wallclock_s}
        for metric in METRICS:
            row[f"{metric}_before"] = targeted_mean(result.before, result.targeted, metric)
            row[f"{metric}_after"] = targeted_mean(result.after, result.targeted, metric)
        per_seed.append(row)
    report: dict = {"job": str(job), "steps": steps, "seeds": seeds, "per_seed": per_seed}
    for metric in METRICS:
        gains = [s[f"{metric}_after"] - s[f"{metric}_before"] for s in per_seed]
        report[metric] = {
            "before_mean": _mean([s[f"{metric}_before"] for s in per_seed]),
            "after_mean": _mean([s[f"{metric}_after"] for s in per_seed]),
            "gain_mean": _mean(gains),
            "gain_std": statistics.stdev(gains) if len(gains) > 1 else 0.0,
            "gain_min": min(gains),
        }
        r = report[metric]
        console.print(
            f"targeted {metric}: {r['before_mean']:.3f} -> {r['after_mean']:.3f} "
            f"(gain {r['gain_mean']:+.3f} ± {r['gain_std']:.3f} over {seeds} seeds, min {r['gain_min']:+.3f})"
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / "grpo.json").write_text(json.dumps(report, indent=2))
    return report
