"""`cropi bench acceleration`: how many fewer steps (and seconds) does each
selector need to reach the targeted accuracy of full-dataset GRPO?

The protocol (docs/design.md §9, the paper's plus the statistics it lacks):
- every selector runs the same paired seeds (same pool, sets and rollout
  seeds), stage schedule and step budget; only `curriculum.selector`
  differs. `full` runs `full_steps` (>= 2.5x the selectors' budget), so the
  levels it is compared at are ones it actually reaches;
- evaluation every `eval_every` steps; steps to a target are interpolated
  on the seed-mean curve (`acceleration_math.py`);
- two definitions: the paper's (target = the selector's own final level;
  acceleration = full's steps / the selector's steps to reach it) and a
  neutral one fixed in advance (levels at 50/75/90 % of full's final gain,
  and the ratio of the gain areas over the selectors' budget);
- paired-seed bootstrap 90 % intervals for every acceleration and for
  CROPI minus each baseline (gain area).

Wall-clock counts what a selector costs to train, not what it costs to
measure: offline rollouts (for selectors that need pass rates or influence),
each stage's selection (influence scoring included) and every GRPO step's
rollout + update (for `dynamic`: every batch it sampled). Evaluation and
checkpointing are excluded: every selector does the same amount of them.

Shared work is computed once per seed and copied, not recomputed: the
offline trajectories (identical for every selector that needs them) and
stage 0's influence selection (identical for `cropi` and `influence_once`,
which start from the same policy). The copy carries the measured cost, so
each selector is still charged for it. Finished runs leave records that
resume the bench across sessions (`finished_record`).
"""

from __future__ import annotations

import functools
import json
import shutil
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from cropi.bench.acceleration_math import (
    acceleration,
    gain_area,
    gain_level,
    mean_curve,
    paired_bootstrap,
    steps_to_target,
    value_at,
)
from cropi.bench.acceleration_report import plot_acceleration, print_summary
from cropi.curriculum import layout
from cropi.curriculum.selectors import NEEDS_INFLUENCE, NEEDS_PASS_RATES
from cropi.embedded import run_job
from cropi.errors import InputError
from cropi.evaluation import targeted_mean
from cropi.runtime.store import LocalStore
from cropi.spec import JobSpec, load_spec
from cropi.tracking import read_metrics

# Run order within a seed: cropi first, so that influence_once and the
# pass-rate heuristics find the offline trajectories (and stage 0's scores) stored.
SELECTORS = ("cropi", "influence_once", "learnability", "learnability_once", "pass_rate", "pass_rate_once",
             "dynamic", "random", "full")
NEEDS_OFFLINE = NEEDS_INFLUENCE | NEEDS_PASS_RATES
LEVELS = (0.5, 0.75, 0.9)  # neutral targets: fractions of full's final gain
BOOTSTRAP_RESAMPLES = 2000


@dataclass(frozen=True)
class Schedule:
    seeds: int
    stages: int
    steps_per_stage: int
    full_steps: int
    eval_every: int
    pool_size: int | None = None  # None: the job's own
    eval_size: int | None = None

    @property
    def steps(self) -> int:
        """The selectors' budget (full runs `full_steps`)."""
        return self.stages * self.steps_per_stage


# The default run: <= 120 min on 2 CPU cores (docs/performance.md). The pool
# and the evaluation sets are cut to fit, never the seeds.
FULL = Schedule(seeds=5, stages=4, steps_per_stage=15, full_steps=150, eval_every=5)
# A smoke-sized run of the same pipeline (<= 10 min); its numbers are noisy
# and not the benchmark's result.
QUICK = Schedule(seeds=2, stages=2, steps_per_stage=5, full_steps=25, eval_every=5, pool_size=400, eval_size=40)


def bench_spec(base: JobSpec, schedule: Schedule, seed: int, selector: str) -> JobSpec:
    spec = base.model_copy(deep=True)
    spec.name = f"{base.name}-accel"  # one name for all selectors: their store keys line up for sharing
    spec.seed = seed
    cur = spec.curriculum
    cur.selector, cur.target_accuracy = selector, None
    if selector == "full":
        cur.stages, cur.steps_per_stage = 1, schedule.full_steps
    else:
        cur.stages, cur.steps_per_stage = schedule.stages, schedule.steps_per_stage
    spec.eval.every = schedule.eval_every
    spec.eval.samples = max(spec.eval.samples, 1)
    apply_cuts(spec, schedule)
    return spec


def apply_cuts(spec: JobSpec, schedule: Schedule) -> None:
    """Cut the pool and the evaluation sets to the schedule's sizes (in place)."""
    if schedule.pool_size:
        spec.data.pool.size = min(spec.data.pool.size or schedule.pool_size, schedule.pool_size)
    if schedule.eval_size:
        for source in [*spec.data.validation, *spec.data.untargeted]:
            source.size = min(source.size or schedule.eval_size, schedule.eval_size)


def _copy_keys(src: Path, dst: Path, prefixes: list[str]) -> None:
    """Copy stored folders (objects with their checksum sidecars) between two run stores."""
    for prefix in prefixes:
        source = src / "store" / prefix
        if source.is_dir():
            shutil.copytree(source, dst / "store" / prefix, dirs_exist_ok=True)


def _share_from_cropi(seed_dir: Path, spec: JobSpec) -> None:
    """Seed a run's store with what the same seed's cropi run already computed."""
    donor = seed_dir / "cropi"
    run_dir = seed_dir / spec.curriculum.selector
    if (spec.curriculum.selector not in NEEDS_OFFLINE or not (donor / "store").is_dir()
            or (run_dir / "store").exists()):
        return
    job = spec.name
    prefixes = [layout.offline_prefix(job)]
    if spec.curriculum.selector == "influence_once":
        prefixes.append(layout.stage_prefix(job, 0))
    _copy_keys(donor, run_dir, prefixes)
    if spec.curriculum.selector == "influence_once":
        store, key = LocalStore(run_dir / "store"), layout.selection_key(job, 0)
        if store.exists(key):
            record = json.loads(store.get(key))
            record.update(selector="influence_once", note="stage 0 scores shared with this seed's cropi run")
            store.put(key, json.dumps(record).encode())


def _stored_json(store: LocalStore, key: str) -> dict | None:
    return json.loads(store.get(key)) if store.exists(key) else None


def run_record(run_dir: Path, spec: JobSpec, metric: str) -> dict:
    """One finished run's curves and cumulative training wall-clock at each evaluated step."""
    records = read_metrics(run_dir)
    targeted = [v.name for v in spec.data.validation]
    untargeted = [v.name for v in spec.data.untargeted]
    evals: dict[int, dict[str, dict[str, float]]] = {}
    step_cost: dict[int, float] = {}
    stage_of: dict[int, int] = {}
    for r in records:
        if r["kind"] == "eval":
            evals.setdefault(r["step"], {})[r["set"]] = r
        elif r["kind"] == "train":
            step_cost[r["step"]] = r["rollout_s"] + r["train_s"]
            stage_of[r["step"]] = r.get("stage", 0)
    store = LocalStore(run_dir / "store")
    job, sps = spec.name, spec.curriculum.steps_per_stage
    offline_s = 0.0
    if spec.curriculum.selector in NEEDS_OFFLINE:
        offline_s = (_stored_json(store, layout.offline_timing_key(job)) or {}).get("seconds", 0.0)
    select_s = [
        (_stored_json(store, layout.selection_key(job, s)) or {}).get("seconds", 0.0)
        for s in range(spec.curriculum.stages)
    ]
    steps = sorted(evals)
    wall = []
    for t in steps:
        if t == 0:
            wall.append(0.0)
            continue
        started = [s for s in range(len(select_s)) if s * sps < t]
        wall.append(offline_s + sum(select_s[s] for s in started)
                    + sum(c for step, c in step_cost.items() if step <= t))
    return {
        "steps": steps,
        "targeted": [targeted_mean(evals[t], targeted, metric) for t in steps],
        "untargeted": [targeted_mean(evals[t], untargeted, metric) for t in steps] if untargeted else [],
        "wallclock_s": wall,
        "offline_s": offline_s,
        "selection_s": select_s,
        "stage_train_s": [sum(c for step, c in step_cost.items() if stage_of[step] == s)
                          for s in range(spec.curriculum.stages)],
    }


def _spread(values: Sequence[float]) -> dict:
    values = list(values)
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "per_seed": values}


def _interval(stat, n_seeds: int) -> list[float] | None:
    ci = paired_bootstrap(n_seeds, stat, BOOTSTRAP_RESAMPLES, seed=0)
    return None if ci is None else [ci[0], ci[1]]


def _curve(runs: list[dict], which: str, seeds: Sequence[int] | None = None) -> list[tuple[float, float]]:
    chosen = [runs[i] for i in seeds] if seeds is not None else runs
    return mean_curve([list(zip(r["steps"], r[which])) for r in chosen])


def _curves_of(per_seed: dict[str, list[dict]]):
    """Seed-mean targeted curves of a resample, computed once per (selector, resample).

    Every interval bootstraps the same seeded resamples, so each statistic
    would otherwise recompute the same means thousands of times.
    """
    @functools.lru_cache(maxsize=None)
    def curve(name: str, seeds: tuple[int, ...] | None) -> list[tuple[float, float]]:
        return _curve(per_seed[name], "targeted", seeds)

    return lambda name, seeds=None: curve(name, None if seeds is None else tuple(seeds))


def _never_is_zero(full: float | None, selector: float | None) -> float | None:
    """An acceleration for the bootstrap: a selector that never gets there is 0x, full never: inf."""
    if selector is None or selector == 0:
        return 0.0 if selector is None else None
    return float("inf") if full is None else full / selector


def summarize(per_seed: dict[str, list[dict]], metric: str, budget: int) -> dict:
    """Every figure of the report from the per-seed run records (a pure function)."""
    if "full" not in per_seed:
        raise InputError("the acceleration benchmark needs the 'full' selector: it defines the targets")
    n = len(per_seed["full"])
    if any(len(runs) != n for runs in per_seed.values()):
        raise ValueError("every selector must have run the same seeds")

    targeted = _curves_of(per_seed)

    def base(seeds=None) -> float:
        return targeted("full", seeds)[0][1]

    def full_final(seeds=None) -> float:
        return targeted("full", seeds)[-1][1]

    def level(q: float, seeds=None) -> float:
        return gain_level(base(seeds), full_final(seeds), q)

    def reach(name: str, target: float, seeds=None) -> float | None:
        return steps_to_target(targeted(name, seeds), target)

    def area(name: str, seeds=None) -> float:
        return gain_area(targeted(name, seeds), base(seeds), budget)

    def own_final(name: str, seeds=None) -> float:
        return value_at(targeted(name, seeds), budget)

    out: dict = {"metric": metric, "budget_steps": budget, "base": base(), "full_final": full_final(),
                 "levels": {f"{int(q * 100)}%": level(q) for q in LEVELS}, "selectors": {}}
    for name, runs in per_seed.items():
        mean = targeted(name)
        steps = [s for s, _ in mean]
        entry: dict = {
            "final_targeted": _spread(value_at(list(zip(r["steps"], r["targeted"])), budget) for r in runs),
            "final_untargeted": (_spread(value_at(list(zip(r["steps"], r["untargeted"])), budget) for r in runs)
                                 if runs[0]["untargeted"] else None),
            "curves": {
                "steps": steps,
                "targeted_mean": [v for _, v in mean],
                "targeted_std": [statistics.stdev(r["targeted"][i] for r in runs) if n > 1 else 0.0
                                 for i in range(len(steps))],
                "wallclock_s_mean": [statistics.fmean(r["wallclock_s"][i] for r in runs) for i in range(len(steps))],
            },
            "offline_s": statistics.fmean(r["offline_s"] for r in runs),
            "selection_s": statistics.fmean(sum(r["selection_s"]) for r in runs),
            "train_wallclock_s": statistics.fmean(r["wallclock_s"][-1] for r in runs),
        }
        if runs[0]["untargeted"]:
            entry["curves"]["untargeted_mean"] = [v for _, v in _curve(runs, "untargeted")]
        train_s = [t for r in runs for t in r.get("stage_train_s", []) if t > 0]
        if name != "full" and train_s:
            # Influence (or heuristic) selection cost per stage as a share of that stage's training time.
            sel = [s for r in runs for s, t in zip(r["selection_s"], r.get("stage_train_s", [])) if t > 0]
            entry["selection_share_of_training"] = statistics.fmean(s / t for s, t in zip(sel, train_s))
        # The paper's definition: the selector's own final level, full's steps to it / the selector's.
        paper_target = own_final(name)
        full_s, sel_s = reach("full", paper_target), reach(name, paper_target)
        entry["paper"] = {
            "target": paper_target, "full_steps": full_s, "steps": sel_s,
            "acceleration": acceleration(full_s, sel_s),
            "interval90": _interval(lambda idx, name=name: _never_is_zero(
                reach("full", own_final(name, idx), idx), reach(name, own_final(name, idx), idx)), n),
        }
        entry["neutral"] = {}
        for q in LEVELS:
            target = level(q)
            full_s, sel_s = reach("full", target), reach(name, target)
            entry["neutral"][f"{int(q * 100)}%"] = {
                "target": target, "steps": sel_s, "acceleration": acceleration(full_s, sel_s),
                "wallclock_s": _wall_at(entry["curves"], sel_s),
                "interval90": _interval(lambda idx, q=q, name=name: _never_is_zero(
                    reach("full", level(q, idx), idx), reach(name, level(q, idx), idx)), n),
            }
        full_area = area("full")
        entry["gain_area"] = area(name)
        entry["area_ratio"] = entry["gain_area"] / full_area if full_area > 0 else None
        entry["area_ratio_interval90"] = _interval(
            lambda idx, name=name: (area(name, idx) / area("full", idx)) if area("full", idx) > 0 else None, n)
        out["selectors"][name] = entry
    for name, entry in out["selectors"].items():
        for q, e in entry["neutral"].items():
            full_wall = out["selectors"]["full"]["neutral"][q]["wallclock_s"]
            e["wallclock_acceleration"] = (full_wall / e["wallclock_s"]) if (full_wall and e["wallclock_s"]) else None
    if "cropi" in per_seed:
        out["cropi_minus"] = {}
        for name in per_seed:
            if name == "cropi":
                continue
            diff = area("cropi") - area(name)
            ci = _interval(lambda idx, name=name: area("cropi", idx) - area(name, idx), n)
            verdict = "tie" if ci is None or ci[0] <= 0 <= ci[1] else ("cropi ahead" if ci[0] > 0 else "cropi behind")
            out["cropi_minus"][name] = {"gain_area_difference": diff, "interval90": ci, "verdict": verdict}
    return out


def _wall_at(curves: dict, step: float | None) -> float | None:
    if step is None:
        return None
    return value_at(list(zip(curves["steps"], curves["wallclock_s_mean"])), step)


def finished_record(out: Path, seed: int, spec: JobSpec, metric: str, console: Console) -> dict:
    """The run record of one (seed, selector): run or resume it, or read back a kept record.

    A finished run leaves a small record under `out/records/` (its curves and
    costs, with the spec it ran); later calls read that instead of the run
    folder, so the records alone (a few KB, easy to keep between sessions)
    resume a bench, and run folders may be deleted once their record exists.
    """
    record_file = out / "records" / f"seed-{seed}" / f"{spec.curriculum.selector}.json"
    if record_file.is_file():
        kept = json.loads(record_file.read_text())
        if kept.get("spec") == record_key(spec) and kept.get("metric") == metric:
            console.print(f"seed {seed}: {spec.curriculum.selector} finished earlier ({record_file})")
            return kept["record"]
    run_dir = out / f"seed-{seed}" / spec.curriculum.selector
    _share_from_cropi(run_dir.parent, spec)
    run_job(spec, run_dir, console)
    record = run_record(run_dir, spec, metric)
    record_file.parent.mkdir(parents=True, exist_ok=True)
    record_file.write_text(json.dumps({"spec": record_key(spec), "metric": metric, "record": record}))
    return record


def record_key(spec: JobSpec) -> str:
    """What a run's record depends on: its spec, less the influence settings for selectors that use none.

    So a bench that varies only influence settings (another job file, another
    `--out`) can reuse the other selectors' records instead of rerunning them.
    """
    data = spec.model_dump(mode="json")
    if spec.curriculum.selector not in NEEDS_INFLUENCE:
        data.pop("influence")
    return json.dumps(data, sort_keys=True)


def run_acceleration_bench(job: Path, out: Path, console: Console, seeds: int | None = None,
                           quick: bool = False, selectors: list[str] | None = None,
                           metric: str = "accuracy", schedule: Schedule | None = None) -> dict:
    base = load_spec(job)
    if not base.data.validation:
        raise InputError(f"{job}: data.validation is empty; the benchmark measures targeted validation accuracy")
    unknown = sorted(set(selectors or []) - set(SELECTORS))
    if unknown:
        raise InputError(f"--selector: unknown {', '.join(unknown)} (choose from {', '.join(SELECTORS)})")
    chosen = [s for s in SELECTORS if s in (selectors or SELECTORS)]
    if "full" not in chosen:
        raise InputError("--selector: 'full' must be included; it defines the targets")
    schedule = schedule or (QUICK if quick else FULL)
    if seeds is not None:
        schedule = Schedule(**{**schedule.__dict__, "seeds": seeds})
    if schedule.seeds < 2:
        raise InputError("--seeds: the paired bootstrap needs at least 2 seeds")
    per_seed: dict[str, list[dict]] = {name: [] for name in chosen}
    for seed in range(schedule.seeds):
        for name in chosen:
            spec = bench_spec(base, schedule, seed, name)
            steps = spec.total_steps
            console.rule(f"seed {seed}: {name} ({spec.curriculum.stages} x {spec.curriculum.steps_per_stage} = {steps} steps)")
            per_seed[name].append(finished_record(out, seed, spec, metric, console))
    report = {"job": str(job), "quick": quick, "seeds": schedule.seeds, "steps": schedule.steps,
              "schedule": schedule.__dict__, **summarize(per_seed, metric, schedule.steps)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "acceleration.json").write_text(json.dumps(report, indent=2))
    plot_acceleration(report, out / "acceleration.png")
    print_summary(report, console)
    return report
