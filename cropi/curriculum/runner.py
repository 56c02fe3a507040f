"""The embedded run: everything in one process, the loop of `cropi run`.

    load data and policy -> evaluate -> offline trajectories (if the selector
    needs them) -> per stage: select -> [rollout -> reward -> GRPO step]* with
    periodic evaluation -> checkpoint, metrics, curves, summary

Which prompts a stage trains on is the selector's job (`selectors.py`).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.progress import Progress as Progress_

from cropi.curriculum.policy import Policy, finish_stage, train_stage
from cropi.curriculum.selection import needs_offline, offline_timing_key, select_stage
from cropi.curriculum.selectors import Selection
from cropi.curriculum.state import Progress, load_state, save_state
from cropi.data.sources import JobData, load_job_data
from cropi.errors import InputError
from cropi.influence.engine import InfluenceEngine
from cropi.plotting import plot_run
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
        self.data: JobData = load_job_data(spec)
        self.policy = Policy(spec, _sft_progress(self.console))
        self.model, self.tokenizer = self.policy.model, self.policy.tokenizer
        self.store = LocalStore(run_dir / "store")
        self.influence = InfluenceEngine(spec, self.store, self.model, self.tokenizer)

    def _phase_bar(self) -> tuple[Progress_, Callable[[str, int, int], None]]:
        bar = Progress_(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                       console=self.console, transient=True)
        tasks: dict[str, int] = {}

        def report(phase: str, done: int, total: int) -> None:
            if phase not in tasks:
                tasks[phase] = bar.add_task(phase, total=total)
            bar.update(tasks[phase], completed=done)

        return bar, report

    def select(self, stage: int) -> Selection:
        bar, report = self._phase_bar()
        with bar:
            return select_stage(self.spec, self.data, self.store, self.influence, stage, report)

    def _collect_offline(self) -> None:
        """Offline trajectories (loaded if stored); their cost is kept beside them for wall-clock accounting."""
        bar, report = self._phase_bar()
        t0 = time.perf_counter()
        with bar:
            self.influence.collect_offline(self.policy.engine, self.data, report)
        key = offline_timing_key(self.spec)
        if not self.store.exists(key):
            # A collection resumed after a kill records only its remaining part.
            self.store.put(key, json.dumps({"seconds": time.perf_counter() - t0}).encode())

    def _save(self, progress: Progress) -> None:
        save_state(self.run_dir, progress, self.model, self.policy.trainer)

    def run(self) -> RunResult:
        """Run the job, or continue it from `state/latest.pt` if a previous run of it was killed."""
        spec, console, d, cur = self.spec, self.console, self.data, self.spec.curriculum
        prepare_run_dir(spec, self.run_dir)
        start = time.perf_counter()
        progress = load_state(self.run_dir, self.model, self.policy.trainer)
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
            progress.before = progress.after = progress.stage_before = self.policy.evaluate(d, 0, log.log)
            self._save(progress)
        else:
            console.print(f"[bold]resuming[/] at step {progress.step} (stage {progress.stage}, "
                          f"{progress.step_in_stage} of its steps done)")
            truncate_metrics(self.run_dir, progress.step)
            log = MetricsLog(self.run_dir, append=True)
        if needs_offline(spec):
            self._collect_offline()
        while progress.stage < cur.stages and not progress.stopped_early:
            self._run_stage(progress, log)
        log.close()
        return self._finish(progress, time.perf_counter() - start)

    def _run_stage(self, progress: Progress, log: MetricsLog) -> None:
        cur, stage = self.spec.curriculum, progress.stage
        selection = self.select(stage)
        n = len(selection.prompt_ids)
        self.console.print(
            f"stage {stage}: {cur.selector} selected {n} of {len(self.data.pool)} prompts"
            f" ({selection.eligible} eligible){'; ' + selection.note if selection.note else ''}"
        )
        if not n:
            self.console.print(f"[yellow]stage {stage}: no eligible prompt to train on; skipping its steps[/]")
        else:
            with Progress_(
                TextColumn(f"[bold]stage {stage} GRPO"), BarColumn(), MofNCompleteColumn(),
                TextColumn("reward {task.fields[reward]:.2f}  acc {task.fields[acc]}"),
                TimeElapsedColumn(), TimeRemainingColumn(), console=self.console,
            ) as bar:
                task = bar.add_task("train", total=cur.steps_per_stage, completed=progress.step_in_stage,
                                    reward=0.0, acc=_fmt_acc(progress.after))
                train_stage(
                    self.policy, self.data, progress, selection, log.log, self._save,
                    on_step=lambda stats: bar.update(task, advance=1, reward=stats["reward_mean"],
                                                     acc=_fmt_acc(progress.after)),
                )
        finish_stage(self.policy, self.data, progress, selection)
        if progress.stopped_early:
            self.console.print(f"targeted accuracy reached {cur.target_accuracy}: stopping after stage {stage}")
        self._save(progress)

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
