"""`cropi bench acceleration`: how many fewer steps (and seconds) does each
selector need to reach the targeted accuracy that full-dataset GRPO ends at?

Every selector runs the same job with the same seeds, stage schedule and
step budget; only `curriculum.selector` differs. The arithmetic (the
paper's definition) is in `acceleration_math.py`.

Wall-clock counts what a selector costs to train, not what it costs to
measure: offline rollouts (for selectors that need pass rates or influence),
each stage's selection (influence scoring included) and every GRPO step's
rollout + update. Evaluation and checkpointing are excluded: every selector
does the same amount of them.

Shared work is computed once per seed and copied, not recomputed: the
offline trajectories (identical for every selector that needs them) and
stage 0's influence selection (identical for `cropi` and `influence_once`,
which start from the same policy). The copy carries the measured cost, so
each selector is still charged for it.
"""

from __future__ import annotations

import json
import shutil
import statistics
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from cropi.bench.acceleration_math import acceleration, mean_curve, steps_to_target
from cropi.curriculum.runner import run_job
from cropi.errors import InputError
from cropi.evaluation import targeted_mean
from cropi.runtime.store import LocalStore
from cropi.spec import JobSpec, load_spec
from cropi.tracking import read_metrics

# Run order within a seed: cropi first, so that influence_once and the
# pass-rate heuristics find the offline trajectories (and stage 0's scores) stored.
SELECTORS = ("cropi", "influence_once", "learnability", "pass_rate", "random", "full")
NEEDS_OFFLINE = {"cropi", "influence_once", "learnability", "pass_rate"}


@dataclass(frozen=True)
class Schedule:
    seeds: int
    stages: int
    steps_per_stage: int
    eval_every: int
    pool_size: int | None = None  # None: the job's own
    eval_size: int | None = None

    @property
    def steps(self) -> int:
        return self.stages * self.steps_per_stage


FULL = Schedule(seeds=3, stages=4, steps_per_stage=25, eval_every=10)
# A smoke-sized run of the same pipeline (one seed, smaller pool and sets);
# its numbers are noisy and not the benchmark's result.
QUICK = Schedule(seeds=1, stages=2, steps_per_stage=15, eval_every=5, pool_size=1000, eval_size=100)


def bench_spec(base: JobSpec, schedule: Schedule, seed: int, selector: str) -> JobSpec:
    spec = base.model_copy(deep=True)
    spec.name = f"{base.name}-accel"  # one name for all selectors: their store keys line up for sharing
    spec.seed = seed
    cur = spec.curriculum
    cur.selector, cur.stages, cur.steps_per_stage, cur.target_accuracy = (
        selector, schedule.stages, schedule.steps_per_stage, None)
    spec.eval.every = schedule.eval_every
    spec.eval.samples = max(spec.eval.samples, 1)
    if schedule.pool_size:
        spec.data.pool.size = min(spec.data.pool.size or schedule.pool_size, schedule.pool_size)
    if schedule.eval_size:
        for source in [*spec.data.validation, *spec.data.untargeted]:
            source.size = min(source.size or schedule.eval_size, schedule.eval_size)
    return spec


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
    prefixes = [f"jobs/{job}/offline"]
    if spec.curriculum.selector == "influence_once":
        prefixes.append(f"jobs/{job}/stages/0")
    _copy_keys(donor, run_dir, prefixes)
    if spec.curriculum.selector == "influence_once":
        store, key = LocalStore(run_dir / "store"), f"jobs/{job}/stages/0/selection.json"
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
    for r in records:
        if r["kind"] == "eval":
            evals.setdefault(r["step"], {})[r["set"]] = r
        elif r["kind"] == "train":
            step_cost[r["step"]] = r["rollout_s"] + r["train_s"]
    store = LocalStore(run_dir / "store")
    job, sps = spec.name, spec.curriculum.steps_per_stage
    offline_s = 0.0
    if spec.curriculum.selector in NEEDS_OFFLINE:
        offline_s = (_stored_json(store, f"jobs/{job}/offline/timing.json") or {}).get("seconds", 0.0)
    select_s = [
        (_stored_json(store, f"jobs/{job}/stages/{s}/selection.json") or {}).get("seconds", 0.0)
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
    }


def _spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "per_seed": values}


def summarize(per_seed: dict[str, list[dict]], metric: str) -> dict:
    """The report: target, and per selector steps/wall-clock to target, accelerations, finals, curves."""
    if "full" not in per_seed:
        raise InputError("the acceleration benchmark needs the 'full' selector: it defines the target")
    full_finals = [r["targeted"][-1] for r in per_seed["full"]]
    target = statistics.fmean(full_finals)
    out: dict = {"metric": metric, "target": target, "selectors": {}}
    reached: dict[str, tuple[int | None, float | None]] = {}
    for name, runs in per_seed.items():
        targeted = mean_curve([list(zip(r["steps"], r["targeted"])) for r in runs])
        step = steps_to_target(targeted, target)
        wall = None
        if step is not None:
            i = runs[0]["steps"].index(step)
            wall = statistics.fmean(r["wallclock_s"][i] for r in runs)
        reached[name] = (step, wall)
        steps = runs[0]["steps"]
        curves = {
            "steps": steps,
            "targeted_mean": [v for _, v in targeted],
            "targeted_std": [statistics.stdev(r["targeted"][i] for r in runs) if len(runs) > 1 else 0.0
                             for i in range(len(steps))],
            "wallclock_s_mean": [statistics.fmean(r["wallclock_s"][i] for r in runs) for i in range(len(steps))],
        }
        if runs[0]["untargeted"]:
            curves["untargeted_mean"] = [v for _, v in mean_curve([list(zip(r["steps"], r["untargeted"])) for r in runs])]
        out["selectors"][name] = {
            "steps_to_target": step,
            "wallclock_to_target_s": wall,
            "final_targeted": _spread([r["targeted"][-1] for r in runs]),
            "final_untargeted": _spread([r["untargeted"][-1] for r in runs]) if runs[0]["untargeted"] else None,
            "offline_s": statistics.fmean(r["offline_s"] for r in runs),
            "selection_s": statistics.fmean(sum(r["selection_s"]) for r in runs),
            "train_wallclock_s": statistics.fmean(r["wallclock_s"][-1] for r in runs),
            "curves": curves,
        }
    full_step, full_wall = reached["full"]
    for name, (step, wall) in reached.items():
        entry = out["selectors"][name]
        entry["step_acceleration"] = acceleration(full_step, step)
        entry["wallclock_acceleration"] = (full_wall / wall) if (full_wall and wall) else None
    return out


def plot_acceleration(report: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("targeted", "step"), ("untargeted", "step"), ("targeted", "wall-clock (s)")]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for ax, (which, x_label) in zip(axes, panels):
        for name, entry in report["selectors"].items():
            c = entry["curves"]
            ys = c.get(f"{which}_mean")
            if ys is None:
                continue
            xs = c["steps"] if x_label == "step" else c["wallclock_s_mean"]
            line, = ax.plot(xs, ys, marker=".", label=name, lw=2.2 if name == "cropi" else 1.2)
            if which == "targeted" and x_label == "step":
                lo = [m - s for m, s in zip(ys, c["targeted_std"])]
                hi = [m + s for m, s in zip(ys, c["targeted_std"])]
                ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.12)
        if which == "targeted":
            ax.axhline(report["target"], color="black", ls="--", lw=0.8, label="target (full, final)")
        ax.set_xlabel(x_label)
        ax.set_ylabel(f"{which} {report['metric']}")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"acceleration benchmark ({report['seeds']} seed(s), {report['steps']} steps; band: ±1 std over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_acceleration_bench(job: Path, out: Path, console: Console, seeds: int | None = None,
                           quick: bool = False, selectors: list[str] | None = None,
                           metric: str = "sampled_accuracy", schedule: Schedule | None = None) -> dict:
    base = load_spec(job)
    if not base.data.validation:
        raise InputError(f"{job}: data.validation is empty; the benchmark measures targeted validation accuracy")
    chosen = [s for s in SELECTORS if s in (selectors or SELECTORS)]
    unknown = sorted(set(selectors or []) - set(SELECTORS))
    if unknown:
        raise InputError(f"--selector: unknown {', '.join(unknown)} (choose from {', '.join(SELECTORS)})")
    if "full" not in chosen:
        raise InputError("--selector: 'full' must be included; it defines the target")
    schedule = schedule or (QUICK if quick else FULL)
    if seeds is not None:
        schedule = Schedule(**{**schedule.__dict__, "seeds": seeds})
    per_seed: dict[str, list[dict]] = {name: [] for name in chosen}
    for seed in range(schedule.seeds):
        seed_dir = out / f"seed-{seed}"
        for name in chosen:
            spec = bench_spec(base, schedule, seed, name)
            console.rule(f"seed {seed}: {name} ({schedule.stages} x {schedule.steps_per_stage} steps)")
            _share_from_cropi(seed_dir, spec)
            run_job(spec, seed_dir / name, console)
            per_seed[name].append(run_record(seed_dir / name, spec, metric))
    report = {"job": str(job), "quick": quick, "seeds": schedule.seeds, "steps": schedule.steps,
              "schedule": schedule.__dict__, **summarize(per_seed, metric)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "acceleration.json").write_text(json.dumps(report, indent=2))
    plot_acceleration(report, out / "acceleration.png")
    _print_summary(report, console)
    return report


def _fmt(value: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return "never" if value is None else f"{value:{spec}}{suffix}"


def _print_summary(report: dict, console: Console) -> None:
    table = Table(title=f"acceleration over full (target: targeted {report['metric']} {report['target']:.3f})")
    for col in ("selector", "steps to target", "step accel.", "wall-clock accel.", "final targeted",
                "final untargeted", "influence/offline s"):
        table.add_column(col, justify="left" if col == "selector" else "right")
    for name, e in report["selectors"].items():
        ft, fu = e["final_targeted"], e["final_untargeted"]
        table.add_row(
            name, _fmt(e["steps_to_target"], "d"), _fmt(e["step_acceleration"], ".2f", "x"),
            _fmt(e["wallclock_acceleration"], ".2f", "x"), f"{ft['mean']:.3f} ± {ft['std']:.3f}",
            "-" if fu is None else f"{fu['mean']:.3f} ± {fu['std']:.3f}",
            f"{e['selection_s'] + e['offline_s']:.0f}",
        )
    console.print(table)
