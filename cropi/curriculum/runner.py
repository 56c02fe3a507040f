"""The embedded run: everything in one process, the loop of `cropi run`.

    load data and policy -> evaluate -> [rollout -> reward -> GRPO step]*
    -> periodic evaluation -> checkpoint, metrics, curves, summary

Selection (which prompts each stage trains on) is the curriculum's job; this
loop only asks `training_prompts()` for them.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from cropi.curriculum.sampler import EpochSampler
from cropi.curriculum.selectors import NEEDS_INFLUENCE, SELECTORS, Selection, SelectionContext
from cropi.data.arith import stream_seed
from cropi.data.sources import JobData, load_job_data
from cropi.data.types import Prompt
from cropi.data.verifiers import reward
from cropi.errors import InputError
from cropi.evaluation import evaluate
from cropi.influence.engine import POOL, InfluenceEngine
from cropi.models.loading import load_policy
from cropi.plotting import plot_run
from cropi.rl.trainer import GRPOTrainer
from cropi.rollout.base import SamplingParams
from cropi.rollout.hf import HFRolloutEngine
from cropi.runtime.store import LocalStore
from cropi.spec import JobSpec
from cropi.tracking import MetricsLog



@dataclass
class RunResult:
    run_dir: Path
    steps: int
    before: dict[str, dict[str, float]]  # set -> {"accuracy", "sampled_accuracy"}
    after: dict[str, dict[str, float]]
    targeted: list[str]
    wallclock_s: float
    history: list[dict] = field(default_factory=list)
    stages: list[dict] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "run_dir": str(self.run_dir),
            "steps": self.steps,
            "before": self.before,
            "after": self.after,
            "targeted": self.targeted,
            "wallclock_s": self.wallclock_s,
            "stages": self.stages,
        }


def prepare_run_dir(spec: JobSpec, run_dir: Path) -> None:
    """Create the run folder; refuse to mix a different job's results into it."""
    spec_file = run_dir / "spec.yaml"
    if spec_file.is_file() and spec_file.read_text() != spec.to_yaml():
        raise InputError(
            f"{run_dir} holds a run of a different spec ({spec_file}); choose another --out or delete that folder"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    spec_file.write_text(spec.to_yaml())


def _sft_progress(console: Console):
    state = {"progress": None}

    def report(step: int, total: int, loss: float) -> None:
        if state["progress"] is None:
            console.print("[bold]Building the built-in tiny model[/] (first use only; cached afterwards)")
            state["progress"] = Progress(
                TextColumn("warm start"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]:.3f}"),
                TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False,
            )
            state["progress"].start()
            state["task"] = state["progress"].add_task("sft", total=total, loss=loss)
        state["progress"].update(state["task"], completed=step, loss=loss)
        if step == total:
            state["progress"].stop()

    return report


class EmbeddedRun:
    def __init__(self, spec: JobSpec, run_dir: Path, console: Console | None = None):
        if spec.rollout.engine != "hf":
            raise InputError("rollout.engine: the embedded run uses the 'hf' engine (vLLM needs the GPU services)")
        self.spec = spec
        self.run_dir = run_dir
        self.console = console or Console()
        torch.manual_seed(spec.seed)
        self.data: JobData = load_job_data(spec)
        self.model, self.tokenizer = load_policy(spec.model.path, spec.model.dtype, _sft_progress(self.console))
        ref = copy.deepcopy(self.model) if spec.rl.kl_coef > 0 else None
        self.engine = HFRolloutEngine(self.model, self.tokenizer, spec.rollout.batch_size)
        self.trainer = GRPOTrainer(self.model, ref, self.tokenizer.pad_token_id, spec.rl, spec.rollout.temperature)
        self.eval_tokens = spec.eval.max_new_tokens or spec.rollout.max_new_tokens
        self.store = LocalStore(run_dir / "store")
        self.influence = InfluenceEngine(spec, self.store, self.model, self.tokenizer)
        self._once: Selection | None = None

    # ----------------------------------------------------------- selection
    def _phase_bar(self) -> tuple[Progress, Callable[[str, int, int], None]]:
        bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                       console=self.console, transient=True)
        tasks: dict[str, int] = {}

        def report(phase: str, done: int, total: int) -> None:
            if phase not in tasks:
                tasks[phase] = bar.add_task(phase, total=total)
            bar.update(tasks[phase], completed=done)

        return bar, report

    def _needs_offline(self) -> bool:
        return self.spec.curriculum.selector not in ("full", "random")

    def select(self, stage: int) -> Selection:
        """The prompts stage `stage` trains on; recorded in the store's selection.json."""
        cur = self.spec.curriculum
        selection = self._once if cur.selector == "influence_once" and self._once else self._compute_selection(stage)
        key = f"jobs/{self.spec.name}/stages/{stage}/selection.json"
        self.store.put(key, json.dumps({"stage": stage, "selector": cur.selector, **selection.to_json()}).encode())
        if cur.selector == "influence_once":
            self._once = selection
        return selection

    def _compute_selection(self, stage: int) -> Selection:
        cur = self.spec.curriculum
        ids = [p.id for p in self.data.pool]
        ctx = SelectionContext(stage=stage, prompt_ids=ids, select_ratio=cur.select_ratio, seed=self.spec.seed)
        if self._needs_offline():
            groups = {g.prompt_id: g for g in self.influence.offline[POOL]}
            ctx.pass_rates = np.array([groups[i].pass_rate for i in ids])
            ctx.eligible = np.array([groups[i].eligible for i in ids])
        if cur.selector in NEEDS_INFLUENCE:
            bar, report = self._phase_bar()
            with bar:
                scores = self.influence.score_stage(stage, report)
            assert scores.prompt_ids == ids
            ctx.scores, ctx.eligible = scores.scores, scores.eligible
        return SELECTORS[cur.selector](ctx)

    def _evaluate(self, step: int, log: MetricsLog) -> dict[str, dict[str, float]]:
        ev = self.spec.eval
        results = evaluate(
            self.engine, self.data.eval_sets, self.eval_tokens, samples=ev.samples,
            temperature=ev.temperature or self.spec.rollout.temperature,
            seed=stream_seed("eval", self.spec.seed, step) % 2**63,
        )
        for name, metrics in results.items():
            log.log("eval", step, set=name, targeted=name in self.data.validation, **metrics)
        targeted = [results[n] for n in self.data.validation]
        if targeted:
            summary = {f"targeted_{k}": sum(t[k] for t in targeted) / len(targeted) for k in targeted[0]}
            log.log("eval_summary", step, **summary)
        return results

    def _targeted_mean(self, results: dict[str, dict[str, float]]) -> float:
        return _targeted_mean_of(results, list(self.data.validation))

    def _rollout_and_train(self, step: int, prompts: list[Prompt]) -> dict[str, float]:
        r = self.spec.rollout
        sampling = SamplingParams(
            temperature=r.temperature, top_p=r.top_p, max_new_tokens=r.max_new_tokens,
            seed=stream_seed("rollout", self.spec.seed, step) % 2**63,
        )
        t0 = time.perf_counter()
        groups = self.engine.generate([p.text for p in prompts], r.n, sampling)
        rewards = [[reward(p, t.text) for t in g] for p, g in zip(prompts, groups)]
        t1 = time.perf_counter()
        stats = self.trainer.step(groups, rewards)
        stats.update(rollout_s=t1 - t0, train_s=time.perf_counter() - t1)
        return stats

    def run(self) -> RunResult:
        spec, console = self.spec, self.console
        prepare_run_dir(spec, self.run_dir)
        start = time.perf_counter()
        log = MetricsLog(self.run_dir)
        d = self.data
        console.print(
            f"[bold]{spec.name}[/]: pool {len(d.pool)} prompts"
            + (f" ({d.decontaminated} dropped: also in an evaluation set)" if d.decontaminated else "")
            + f", validation {', '.join(f'{k}={len(v)}' for k, v in d.validation.items()) or '-'}"
            + (f", untargeted {', '.join(f'{k}={len(v)}' for k, v in d.untargeted.items())}" if d.untargeted else "")
            + f"; {spec.total_steps} GRPO steps x {spec.rl.batch_prompts} prompts x {spec.rollout.n} responses"
        )
        before = self._evaluate(0, log)
        if self._needs_offline():
            bar, report = self._phase_bar()
            with bar:
                self.influence.collect_offline(self.engine, self.data, report)
        by_id = {p.id: p for p in d.pool}
        cur = spec.curriculum
        history: list[dict] = []
        stages: list[dict] = []
        after = before
        step = 0
        for stage in range(cur.stages):
            selection = self.select(stage)
            prompts = [by_id[i] for i in selection.prompt_ids]
            console.print(
                f"stage {stage}: {cur.selector} selected {len(prompts)} of {len(d.pool)} prompts"
                f" ({selection.eligible} eligible){'; ' + selection.note if selection.note else ''}"
            )
            stage_before = after
            if not prompts:
                console.print(f"[yellow]stage {stage}: no eligible prompt to train on; skipping its steps[/]")
                stages.append({"stage": stage, "selected": 0, "eligible": selection.eligible,
                               "note": "skipped: nothing eligible", "before": after, "after": after, "end_step": step})
                continue
            sampler = EpochSampler(prompts, spec.rl.batch_prompts, seed=f"{spec.seed}-stage{stage}")
            with Progress(
                TextColumn(f"[bold]stage {stage} GRPO"), BarColumn(), MofNCompleteColumn(),
                TextColumn("reward {task.fields[reward]:.2f}  acc {task.fields[acc]}"),
                TimeElapsedColumn(), TimeRemainingColumn(), console=console,
            ) as bar:
                task = bar.add_task("train", total=cur.steps_per_stage, reward=0.0, acc=_fmt_acc(after))
                for i in range(cur.steps_per_stage):
                    step += 1
                    stats = self._rollout_and_train(step, sampler.batch(i))
                    log.log("train", step, stage=stage, **stats)
                    history.append({"step": step, "stage": stage, **stats})
                    if step % spec.eval.every == 0 or i == cur.steps_per_stage - 1:
                        after = self._evaluate(step, log)
                    bar.update(task, advance=1, reward=stats["reward_mean"], acc=_fmt_acc(after))
            stages.append({"stage": stage, "selected": len(prompts), "eligible": selection.eligible,
                           "note": selection.note, "before": stage_before, "after": after, "end_step": step})
            if cur.reset_optimizer:
                self.trainer.reset_optimizer()
            if cur.target_accuracy is not None and self._targeted_mean(after) >= cur.target_accuracy:
                console.print(f"targeted accuracy reached {cur.target_accuracy}: stopping after stage {stage}")
                break
        checkpoint = self.run_dir / "checkpoint"
        self.model.save_pretrained(checkpoint)
        self.tokenizer.save_pretrained(checkpoint)
        log.close()
        plot_run(self.run_dir)
        result = RunResult(
            run_dir=self.run_dir, steps=step, before=before, after=after,
            targeted=list(d.validation), wallclock_s=time.perf_counter() - start, history=history, stages=stages,
        )
        (self.run_dir / "summary.json").write_text(json.dumps(result.to_json(), indent=2))
        return result


def _targeted_mean_of(results: dict[str, dict[str, float]], targeted: list[str]) -> float:
    return sum(results[n]["accuracy"] for n in targeted) / max(1, len(targeted))


def _fmt_acc(results: dict[str, dict[str, float]]) -> str:
    return " ".join(f"{k}={v['accuracy']:.2f}" for k, v in results.items()) or "-"


def run_job(spec: JobSpec, run_dir: Path, console: Console | None = None) -> RunResult:
    return EmbeddedRun(spec, run_dir, console).run()
