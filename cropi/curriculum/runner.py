"""The embedded run: everything in one process, the loop of `cropi run`.

    load data and policy -> evaluate -> offline trajectories (if the selector
    needs them) -> per stage: select -> [rollout -> reward -> GRPO step]* with
    periodic evaluation -> checkpoint, metrics, curves, summary

Which prompts a stage trains on is the selector's job (`selectors.py`).
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as Progress_

from cropi.curriculum.sampler import EpochSampler
from cropi.curriculum.state import Progress, load_state, save_state
from cropi.curriculum.selectors import NEEDS_INFLUENCE, SELECTORS, Selection, SelectionContext
from cropi.data.arith import stream_seed
from cropi.data.sources import JobData, load_job_data
from cropi.data.types import Prompt
from cropi.data.verifiers import reward
from cropi.errors import InputError
from cropi.evaluation import evaluate, targeted_mean
from cropi.influence.engine import POOL, InfluenceEngine
from cropi.models.loading import load_policy
from cropi.plotting import plot_run
from cropi.rl.trainer import GRPOTrainer
from cropi.rollout.base import SamplingParams
from cropi.rollout.hf import HFRolloutEngine
from cropi.runtime.store import LocalStore
from cropi.spec import JobSpec
from cropi.tracking import MetricsLog, truncate_metrics


@dataclass
class RunResult:
    run_dir: Path
    steps: int
    before: dict[str, dict[str, float]]  # set -> {"accuracy", "sampled_accuracy"}
    after: dict[str, dict[str, float]]
    targeted: list[str]
    wallclock_s: float
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


def clear_progress(spec: JobSpec, run_dir: Path) -> None:
    """Forget a run's progress (state, store, metrics) so that it starts over.

    Refuses, like a run does, when the folder holds a different job.
    """
    prepare_run_dir(spec, run_dir)
    for name in ("state", "store", "tb", "checkpoint"):
        shutil.rmtree(run_dir / name, ignore_errors=True)
    for name in ("metrics.jsonl", "summary.json", "curves.png"):
        (run_dir / name).unlink(missing_ok=True)


def _sft_progress(console: Console):
    state = {"progress": None}

    def report(step: int, total: int, loss: float) -> None:
        if state["progress"] is None:
            console.print("[bold]Building the built-in tiny model[/] (first use only; cached afterwards)")
            state["progress"] = Progress_(
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

    # ----------------------------------------------------------- selection
    def _phase_bar(self) -> tuple[Progress_, Callable[[str, int, int], None]]:
        bar = Progress_(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                       console=self.console, transient=True)
        tasks: dict[str, int] = {}

        def report(phase: str, done: int, total: int) -> None:
            if phase not in tasks:
                tasks[phase] = bar.add_task(phase, total=total)
            bar.update(tasks[phase], completed=done)

        return bar, report

    def _needs_offline(self) -> bool:
        return self.spec.curriculum.selector not in ("full", "random")

    def _selection_key(self, stage: int) -> str:
        return f"jobs/{self.spec.name}/stages/{stage}/selection.json"

    def select(self, stage: int) -> Selection:
        """The prompts stage `stage` trains on, recorded in the store's selection.json.

        A stage whose selection is already stored (a resumed run) reuses it:
        recomputing would score with the mid-stage policy, not the one the
        stage started from.
        """
        cur = self.spec.curriculum
        key = self._selection_key(stage)
        if self.store.exists(key):
            return Selection.from_json(json.loads(self.store.get(key)))
        if cur.selector == "influence_once" and stage > 0:
            selection = Selection.from_json(json.loads(self.store.get(self._selection_key(0))))
            selection.seconds = 0.0  # reusing stage 0's choice costs nothing
            selection.note = "stage 0's selection, kept"
        else:
            t0 = time.perf_counter()
            selection = self._compute_selection(stage)
            selection.seconds = time.perf_counter() - t0
        self.store.put(key, json.dumps({"stage": stage, "selector": cur.selector, **selection.to_json()}).encode())
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

    def _offline_timing_key(self) -> str:
        return f"jobs/{self.spec.name}/offline/timing.json"

    def _collect_offline(self) -> None:
        """Offline trajectories (loaded if stored); their cost is kept beside them for wall-clock accounting."""
        bar, report = self._phase_bar()
        t0 = time.perf_counter()
        with bar:
            self.influence.collect_offline(self.engine, self.data, report)
        key = self._offline_timing_key()
        if not self.store.exists(key):
            # A collection resumed after a kill records only its remaining part.
            self.store.put(key, json.dumps({"seconds": time.perf_counter() - t0}).encode())

    def _evaluate(self, step: int, log: MetricsLog) -> dict[str, dict[str, float]]:
        ev = self.spec.eval
        results = evaluate(
            self.engine, self.data.eval_sets, self.eval_tokens, samples=ev.samples,
            temperature=ev.temperature or self.spec.rollout.temperature,
            seed=stream_seed("eval", self.spec.seed, step) % 2**63,
        )
        for name, metrics in results.items():
            log.log("eval", step, set=name, targeted=name in self.data.validation, **metrics)
        targeted = list(self.data.validation)
        if targeted:
            metrics = results[targeted[0]]
            log.log("eval_summary", step, **{f"targeted_{m}": targeted_mean(results, targeted, m) for m in metrics})
        return results

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
        """Run the job, or continue it from `state/latest.pt` if a previous run of it was killed."""
        spec, console, d, cur = self.spec, self.console, self.data, self.spec.curriculum
        prepare_run_dir(spec, self.run_dir)
        start = time.perf_counter()
        progress = load_state(self.run_dir, self.model, self.trainer)
        console.print(
            f"[bold]{spec.name}[/]: pool {len(d.pool)} prompts"
            + (f" ({d.decontaminated} dropped: also in an evaluation set)" if d.decontaminated else "")
            + f", validation {', '.join(f'{k}={len(v)}' for k, v in d.validation.items()) or '-'}"
            + (f", untargeted {', '.join(f'{k}={len(v)}' for k, v in d.untargeted.items())}" if d.untargeted else "")
            + f"; {spec.total_steps} GRPO steps x {spec.rl.batch_prompts} prompts x {spec.rollout.n} responses"
        )
        if progress is None:
            log = MetricsLog(self.run_dir)
            progress = Progress()
            progress.before = progress.after = progress.stage_before = self._evaluate(0, log)
            save_state(self.run_dir, progress, self.model, self.trainer)
        else:
            console.print(f"[bold]resuming[/] at step {progress.step} (stage {progress.stage}, "
                          f"{progress.step_in_stage} of its steps done)")
            truncate_metrics(self.run_dir, progress.step)
            log = MetricsLog(self.run_dir, append=True)
        if self._needs_offline():
            self._collect_offline()
        while progress.stage < cur.stages and not progress.stopped_early:
            self._run_stage(progress, log)
        log.close()
        return self._finish(progress, time.perf_counter() - start)

    def _run_stage(self, progress: Progress, log: MetricsLog) -> None:
        spec, cur, stage = self.spec, self.spec.curriculum, progress.stage
        selection = self.select(stage)
        by_id = {p.id: p for p in self.data.pool}
        prompts = [by_id[i] for i in selection.prompt_ids]
        self.console.print(
            f"stage {stage}: {cur.selector} selected {len(prompts)} of {len(self.data.pool)} prompts"
            f" ({selection.eligible} eligible){'; ' + selection.note if selection.note else ''}"
        )
        if not prompts:
            self.console.print(f"[yellow]stage {stage}: no eligible prompt to train on; skipping its steps[/]")
        else:
            sampler = EpochSampler(prompts, spec.rl.batch_prompts, seed=f"{spec.seed}-stage{stage}")
            with Progress_(
                TextColumn(f"[bold]stage {stage} GRPO"), BarColumn(), MofNCompleteColumn(),
                TextColumn("reward {task.fields[reward]:.2f}  acc {task.fields[acc]}"),
                TimeElapsedColumn(), TimeRemainingColumn(), console=self.console,
            ) as bar:
                task = bar.add_task("train", total=cur.steps_per_stage, completed=progress.step_in_stage,
                                    reward=0.0, acc=_fmt_acc(progress.after))
                while progress.step_in_stage < cur.steps_per_stage:
                    i, step = progress.step_in_stage, progress.step + 1
                    stats = self._rollout_and_train(step, sampler.batch(i))
                    log.log("train", step, stage=stage, **stats)
                    if step % spec.eval.every == 0 or i == cur.steps_per_stage - 1:
                        progress.after = self._evaluate(step, log)
                    progress.step, progress.step_in_stage = step, i + 1
                    save_state(self.run_dir, progress, self.model, self.trainer)
                    bar.update(task, advance=1, reward=stats["reward_mean"], acc=_fmt_acc(progress.after))
        progress.stages.append({
            "stage": stage, "selected": len(prompts), "eligible": selection.eligible,
            "note": selection.note or ("" if prompts else "skipped: nothing eligible"),
            "before": progress.stage_before, "after": progress.after, "end_step": progress.step,
        })
        if cur.reset_optimizer:
            self.trainer.reset_optimizer()
        if cur.target_accuracy is not None and targeted_mean(progress.after, list(self.data.validation)) >= cur.target_accuracy:
            self.console.print(f"targeted accuracy reached {cur.target_accuracy}: stopping after stage {stage}")
            progress.stopped_early = True
        progress.stage, progress.step_in_stage, progress.stage_before = stage + 1, 0, progress.after
        save_state(self.run_dir, progress, self.model, self.trainer)

    def _finish(self, progress: Progress, seconds: float) -> RunResult:
        d = self.data
        checkpoint = self.run_dir / "checkpoint"
        self.model.save_pretrained(checkpoint)
        self.tokenizer.save_pretrained(checkpoint)
        plot_run(self.run_dir)
        result = RunResult(
            run_dir=self.run_dir, steps=progress.step, before=progress.before, after=progress.after,
            targeted=list(d.validation), wallclock_s=seconds, stages=progress.stages,
        )
        (self.run_dir / "summary.json").write_text(json.dumps(result.to_json(), indent=2))
        return result


def _fmt_acc(results: dict[str, dict[str, float]]) -> str:
    return " ".join(f"{k}={v['accuracy']:.2f}" for k, v in results.items()) or "-"


def run_job(spec: JobSpec, run_dir: Path, console: Console | None = None) -> RunResult:
    return EmbeddedRun(spec, run_dir, console).run()
