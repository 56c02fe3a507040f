"""`cropi bench testbed`: does the built-in testbed behave like real RLVR?

Selector-free: it runs only full-data GRPO and GRPO on two skill subsets of
the pool, so its verdict cannot favour any selector. The testbed (model,
tasks, GRPO settings) is fixed by these criteria *before* selectors are
compared (docs/design.md §9):

- greedy rises: full-data GRPO raises greedy targeted accuracy by at least
  `MIN_GREEDY_GAIN` (seed mean, and on every seed);
- latent capability: the base policy's pass@8 on the targeted sets is at
  least `MIN_PASS_RATIO` times its greedy accuracy;
- skill-specific lessons: GRPO on the pool's skills that no targeted set
  uses gains at most `MAX_UNRELATED_SHARE` of what GRPO on the targeted
  skills alone gains (targeted greedy accuracy, seed means);
- untargeted sets hold: under full-data GRPO their greedy accuracy falls by
  at most `MAX_UNTARGETED_DROP`.

Every arm trains for the full-data budget of `cropi bench acceleration`.
Each seed's run folder is kept, so an interrupted bench resumes there.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from urllib.parse import parse_qsl, urlencode

import torch
from rich.console import Console
from rich.table import Table

from cropi.bench.acceleration import FULL, apply_cuts
from cropi.embedded import run_job
from cropi.data import arith
from cropi.data.sources import BUILTIN_ARITH, load_job_data
from cropi.errors import InputError
from cropi.evaluation import evaluate, targeted_mean
from cropi.models.loading import load_policy
from cropi.rollout.hf import HFRolloutEngine
from cropi.spec import JobSpec, load_spec

MIN_GREEDY_GAIN = 0.10
MIN_PASS_RATIO = 2.0
MAX_UNRELATED_SHARE = 1 / 3
MAX_UNTARGETED_DROP = 0.02
PASS_K = 8
ARMS = ("full", "targeted_skills", "unrelated_skills")


def _skills_of(source: str, where: str) -> tuple[str, ...]:
    name, _, query = source.partition("?")
    if name != BUILTIN_ARITH:
        raise InputError(f"{where}: the testbed bench needs {BUILTIN_ARITH} sources (got a file or another source)")
    return arith.parse_query(query).get("skills", tuple(arith.SKILLS))


def skill_split(spec: JobSpec) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(skills the targeted sets use, the pool's other skills)."""
    pool_skills = _skills_of(spec.data.pool.source, "data.pool.source")
    targeted: list[str] = []
    for i, v in enumerate(spec.data.validation):
        targeted += [s for s in _skills_of(v.source, f"data.validation.{i}.source") if s not in targeted]
    unrelated = tuple(s for s in pool_skills if s not in targeted)
    if not unrelated:
        raise InputError("data.pool.source: every pool skill is targeted; no unrelated skill is left to train on")
    return tuple(s for s in pool_skills if s in targeted), unrelated


def _with_skills(source: str, skills: tuple[str, ...]) -> str:
    name, _, query = source.partition("?")
    opts = [(k, v) for k, v in parse_qsl(query, keep_blank_values=True) if k != "skills"]
    return f"{name}?{urlencode([('skills', ','.join(skills)), *opts], safe=',')}"


def arm_spec(base: JobSpec, arm: str, seed: int, steps: int) -> JobSpec:
    spec = base.model_copy(deep=True)
    spec.name = f"{base.name}-testbed-{arm.replace('_', '-')}"
    spec.seed = seed
    cur = spec.curriculum
    cur.selector, cur.stages, cur.steps_per_stage, cur.target_accuracy = "full", 1, steps, None
    spec.eval.every = max(1, steps // 6)
    apply_cuts(spec, FULL)  # the benchmark's testbed: its pool and evaluation-set sizes
    targeted, unrelated = skill_split(base)
    if arm == "targeted_skills":
        spec.data.pool.source = _with_skills(spec.data.pool.source, targeted)
    elif arm == "unrelated_skills":
        spec.data.pool.source = _with_skills(spec.data.pool.source, unrelated)
    return spec


def base_capability(spec: JobSpec, k: int = PASS_K) -> dict[str, dict[str, float]]:
    """Greedy accuracy and pass@k of the base policy on every evaluation set."""
    data = load_job_data(spec)
    torch.manual_seed(spec.seed)
    model, tokenizer = load_policy(spec.model.path, spec.model.dtype)
    engine = HFRolloutEngine(model, tokenizer, spec.rollout.batch_size)
    return evaluate(engine, data.eval_sets, spec.eval.max_new_tokens or spec.rollout.max_new_tokens, samples=k,
                    temperature=spec.eval.temperature or spec.rollout.temperature, seed=spec.seed)


def _stat(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "per_seed": values}


def run_testbed_bench(job: Path, seeds: int, out: Path, console: Console, steps: int | None = None) -> dict:
    base = load_spec(job)
    if not base.data.validation:
        raise InputError(f"{job}: data.validation is empty; the testbed bench measures targeted accuracy")
    steps = steps or FULL.full_steps
    targeted_skills, unrelated_skills = skill_split(base)
    targeted = [v.name for v in base.data.validation]
    untargeted = [u.name for u in base.data.untargeted]
    rows = []
    for seed in range(seeds):
        seed_dir = out / f"seed-{seed}"
        seed_dir.mkdir(parents=True, exist_ok=True)
        cap_file = seed_dir / "base_capability.json"
        if not cap_file.is_file():
            console.print(f"[bold]seed {seed}[/]: base policy, greedy and pass@{PASS_K}")
            cap_file.write_text(json.dumps(base_capability(arm_spec(base, "full", seed, steps))))
        row = {"seed": seed, "base": json.loads(cap_file.read_text()), "arms": {}}
        for arm in ARMS:
            console.rule(f"seed {seed}: {arm} ({steps} GRPO steps)")
            result = run_job(arm_spec(base, arm, seed, steps), seed_dir / arm, console)
            row["arms"][arm] = {"before": result.before, "after": result.after}
        rows.append(row)
    report = verdict(rows, targeted, untargeted)
    report.update(job=str(job), seeds=seeds, steps=steps, targeted_skills=list(targeted_skills),
                  unrelated_skills=list(unrelated_skills), per_seed=rows)
    out.mkdir(parents=True, exist_ok=True)
    (out / "testbed.json").write_text(json.dumps(report, indent=2))
    return report


def verdict(rows: list[dict], targeted: list[str], untargeted: list[str]) -> dict:
    """The four criteria from per-seed results (pure: tested on hand-made rows)."""
    def gain(row: dict, arm: str, names: list[str]) -> float:
        r = row["arms"][arm]
        return targeted_mean(r["after"], names) - targeted_mean(r["before"], names)

    greedy_gain = [gain(r, "full", targeted) for r in rows]
    base_greedy = [targeted_mean(r["base"], targeted) for r in rows]
    base_pass = [targeted_mean(r["base"], targeted, "pass_at_k") for r in rows]
    tgt_gain = [gain(r, "targeted_skills", targeted) for r in rows]
    unr_gain = [gain(r, "unrelated_skills", targeted) for r in rows]
    mean_tgt, mean_unr = statistics.fmean(tgt_gain), statistics.fmean(unr_gain)
    share = mean_unr / mean_tgt if mean_tgt > 0 else float("inf")
    pass_ratio = statistics.fmean(base_pass) / max(statistics.fmean(base_greedy), 1e-9)
    untargeted_change = {name: _stat([gain(r, "full", [name]) for r in rows]) for name in untargeted}
    criteria = {
        "greedy_rises": {
            "value": _stat(greedy_gain), "goal": f">= {MIN_GREEDY_GAIN} (mean), every seed > 0",
            "met": statistics.fmean(greedy_gain) >= MIN_GREEDY_GAIN and min(greedy_gain) > 0,
        },
        "latent_capability": {
            "value": pass_ratio, "greedy": _stat(base_greedy), f"pass_at_{PASS_K}": _stat(base_pass),
            "goal": f"pass@{PASS_K} >= {MIN_PASS_RATIO} x greedy", "met": pass_ratio >= MIN_PASS_RATIO,
        },
        "skill_specific": {
            "value": share, "targeted_skills_gain": _stat(tgt_gain), "unrelated_skills_gain": _stat(unr_gain),
            "goal": f"unrelated gain <= {MAX_UNRELATED_SHARE:.3f} x targeted-skills gain",
            "met": mean_tgt > 0 and mean_unr <= MAX_UNRELATED_SHARE * mean_tgt,
        },
        "untargeted_hold": {
            "value": untargeted_change, "goal": f"each untargeted set's greedy change >= -{MAX_UNTARGETED_DROP}",
            "met": all(v["mean"] >= -MAX_UNTARGETED_DROP for v in untargeted_change.values()),
        },
    }
    return {"criteria": criteria, "all_met": all(c["met"] for c in criteria.values())}


def print_verdict(report: dict, console: Console) -> None:
    c = report["criteria"]
    table = Table(title=f"testbed ({report['seeds']} seeds, {report['steps']} GRPO steps per arm)")
    for col in ("criterion", "measured", "goal", "met"):
        table.add_column(col)
    g = c["greedy_rises"]["value"]
    table.add_row("greedy rises", f"{g['mean']:+.3f} ± {g['std']:.3f} (min {min(g['per_seed']):+.3f})",
                  c["greedy_rises"]["goal"], _yes(c["greedy_rises"]["met"]))
    lc = c["latent_capability"]
    table.add_row("latent capability", f"pass@{PASS_K} {lc[f'pass_at_{PASS_K}']['mean']:.3f} / greedy "
                  f"{lc['greedy']['mean']:.3f} = {lc['value']:.2f}x", lc["goal"], _yes(lc["met"]))
    sk = c["skill_specific"]
    table.add_row("skill-specific", f"unrelated {sk['unrelated_skills_gain']['mean']:+.3f} vs targeted skills "
                  f"{sk['targeted_skills_gain']['mean']:+.3f}", sk["goal"], _yes(sk["met"]))
    uh = c["untargeted_hold"]
    table.add_row("untargeted hold", ", ".join(f"{k} {v['mean']:+.3f}" for k, v in uh["value"].items()) or "-",
                  uh["goal"], _yes(uh["met"]))
    console.print(table)


def _yes(met: bool) -> str:
    return "[green]yes[/]" if met else "[red]no[/]"
