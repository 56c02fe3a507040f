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
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from cropi.curriculum.sampler import EpochSampler
from cropi.data.arith import stream_seed
from cropi.data.sources import JobData, load_job_data
from cropi.data.types import Prompt
from cropi.data.verifiers import reward
from cropi.errors import InputError
from cropi.evaluation import evaluate
from cropi.models.loading import load_policy
from cropi.plotting import plot_run
from cropi.rl.trainer import GRPOTrainer
from cropi.rollout.base import SamplingParams
from cropi.rollout.hf import HFRolloutEngine
from cropi.spec import JobSpec
from cropi.tracking import MetricsLog

SUPPORTED_SELECTORS = ("full",)


@dataclass
class RunResult:
    run_dir: Path
    steps: int
    before: dict[str, dict[str, float]]  # set -> {"accuracy", "sampled_accuracy"}
    after: dict[str, dict[str, float]]
    targeted: list[str]
    wallclock_s: float
    history: list[dict] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "run_dir": str(self.run_dir),
            "steps": self.steps,
            "before": self.before,
            "after": self.after,
            "targeted": self.targeted,
            "wallclock_s": self.wallclock_s,
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
        if spec.curriculum.selector not in SUPPORTED_SELECTORS:
            raise InputError(
                f"curriculum.selector: {spec.curriculum.selector!r} is not available in this version; "
                f"supported: {', '.join(SUPPORTED_SELECTORS)}"
            )
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

    def training_prompts(self) -> list[Prompt]:
        return self.data.pool  # selector "full"

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
        sampler = EpochSampler(self.training_prompts(), spec.rl.batch_prompts, seed=f"{spec.seed}-train")
        history: list[dict] = []
        after = before
        with Progress(
            TextColumn("[bold]GRPO"), BarColumn(), MofNCompleteColumn(),
            TextColumn("reward {task.fields[reward]:.2f}  acc {task.fields[acc]}"),
            TimeElapsedColumn(), TimeRemainingColumn(), console=console,
        ) as bar:
            task = bar.add_task("train", total=spec.total_steps, reward=0.0, acc=_fmt_acc(before))
            for step in range(1, spec.total_steps + 1):
                stats = self._rollout_and_train(step, sampler.batch(step - 1))
                log.log("train", step, **stats)
                history.append({"step": step, **stats})
                if step % spec.eval.every == 0 or step == spec.total_steps:
                    after = self._evaluate(step, log)
                bar.update(task, advance=1, reward=stats["reward_mean"], acc=_fmt_acc(after))
        checkpoint = self.run_dir / "checkpoint"
        self.model.save_pretrained(checkpoint)
        self.tokenizer.save_pretrained(checkpoint)
        log.close()
        plot_run(self.run_dir)
        result = RunResult(
            run_dir=self.run_dir, steps=spec.total_steps, before=before, after=after,
            targeted=list(d.validation), wallclock_s=time.perf_counter() - start, history=history,
        )
        (self.run_dir / "summary.json").write_text(json.dumps(result.to_json(), indent=2))
        return result


def _fmt_acc(results: dict[str, dict[str, float]]) -> str:
    return " ".join(f"{k}={v['accuracy']:.2f}" for k, v in results.items()) or "-"


def run_job(spec: JobSpec, run_dir: Path, console: Console | None = None) -> RunResult:
    return EmbeddedRun(spec, run_dir, console).run()
