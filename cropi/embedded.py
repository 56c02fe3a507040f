"""The embedded run (`cropi run`): the services' controller and workers in one
process, on a private redis-server (unix socket, AOF in the run folder) and a
store folder. The stage machine, the task bus and the executors are the
ones a cluster runs (`curriculum/controller.py`, `runtime/worker.py`,
`executors/`); only the loop that feeds them is local:

    controller.tick() -> claim a task -> run its handler -> ... until the job ends

Killing `cropi run` and running it again resumes: Redis comes back from its
append-only file, the task that was running is taken back by the same
consumer, and the trainer continues from its state in the store. Running
it again after the job failed continues it too, from the start of the
stage it failed in (everything before is stored and nothing stored is
redone). A stored part found unreadable on the way (a flipped byte) is
recomputed here by its task's handler, with a warning naming its key.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from cropi.curriculum import layout
from cropi.curriculum.controller import Controller
from cropi.curriculum.controller import cached_job_data as job_data  # the controller's view reuses it
from cropi.curriculum.stage import load_trainer_state
from cropi.curriculum.state import Progress
from cropi.devices import resolve_device
from cropi.display import LiveProgress
from cropi.errors import InputError
from cropi.executors import JobExecutors
from cropi.executors.inline import TaskRecompute, job_warning
from cropi.models.loading import resolve_model_path
from cropi.plotting import plot_run
from cropi.runtime.jobs import TERMINAL, JobRegistry, Phase
from cropi.runtime.queue import TaskBus
from cropi.runtime.redis_server import RedisServer
from cropi.runtime.store import LocalStore
from cropi.runtime.tasks import RunObserver, TaskContext, TaskKind
from cropi.runtime.worker import Worker
from cropi.spec import JobSpec
from cropi.tracking.base import check_backends, run_key
from cropi.tracking.observer import TrackingObserver, local_tracking

KINDS = (TaskKind.OFFLINE, TaskKind.PROJECT, TaskKind.TRAIN)


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


def check_run_dir(spec: JobSpec, run_dir: Path) -> None:
    """Refuse to mix a different job's results into a run folder (creates nothing)."""
    spec_file = run_dir / "spec.yaml"
    if spec_file.is_file() and spec_file.read_text() != spec.to_yaml():
        raise InputError(
            f"{run_dir} holds a run of a different spec ({spec_file}); choose another --out or delete that folder"
        )


def prepare_run_dir(spec: JobSpec, run_dir: Path) -> None:
    """Create the run folder; refuse to mix a different job's results into it."""
    check_run_dir(spec, run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "spec.yaml").write_text(spec.to_yaml())


def _missing_folders(run_dir: Path) -> list[Path]:
    """The folders `run_dir.mkdir(parents=True)` would create, deepest first."""
    missing = []
    for folder in (run_dir, *run_dir.parents):
        if folder.exists():
            break
        missing.append(folder)
    return missing


def _remove_created(created: list[Path]) -> None:
    """Remove the folders this call created: the run folder, and the parents it made if they are still empty."""
    if not created:
        return
    shutil.rmtree(created[0], ignore_errors=True)
    for folder in created[1:]:
        try:
            folder.rmdir()  # only if empty: never anything else put there meanwhile
        except OSError:
            break


def _trained(run_dir: Path) -> bool:
    """Did the folder's run complete a training step? (its trainer state is stored after each one)"""
    return any((run_dir / "store").glob(layout.trainer_state_key("*")))  # whichever job the folder held


def clear_progress(spec: JobSpec, run_dir: Path) -> None:
    """Forget a run's progress (state, store, metrics) so that it starts over.

    A folder whose run never trained (it failed to start, or before its first
    step) takes the new spec. One that holds trained steps of a different
    spec is refused, like a run is: those results are not thrown away by a typo.
    """
    if not run_dir.exists():
        return  # nothing to forget; the run creates the folder once its spec and data are valid
    spec_file = run_dir / "spec.yaml"
    if spec_file.is_file() and spec_file.read_text() != spec.to_yaml() and not _trained(run_dir):
        spec_file.unlink()
    prepare_run_dir(spec, run_dir)
    for name in ("state", "store", "tb", "checkpoint", "redis"):
        shutil.rmtree(run_dir / name, ignore_errors=True)
    for name in ("metrics.jsonl", "summary.json", "curves.png"):
        (run_dir / name).unlink(missing_ok=True)


def _sft_progress(console: Console):
    """The built-in model's build (minutes, first use only): a bar on a terminal, else periodic lines."""
    state: dict[str, LiveProgress] = {}

    def report(step: int, total: int, loss: float) -> None:
        if "bar" not in state:
            console.print("[bold]Building the built-in tiny model[/] (first use only; cached afterwards)")
            state["bar"] = LiveProgress(console, "warm start (SFT)", total, unit="step")
        state["bar"].update(step, text=f"loss {loss:.3f}")
        if step == total:
            state["bar"].stop()

    return report


def stored_records(store: LocalStore, job: str) -> list[dict]:
    """Every metric record the job's trainer state holds, stage by stage ([] before its first save)."""
    key = layout.trainer_state_key(job)
    if not store.exists(key):
        return []
    records = load_trainer_state(store.get(key), key)["records"]
    return [r for stage in sorted(records, key=int) for r in records[stage]]


class EmbeddedRun(RunObserver):
    """Drives one job to its end in this process, and shows its progress (it observes its train tasks)."""

    def __init__(self, spec: JobSpec, run_dir: Path, console: Console | None = None):
        self.spec = spec
        self.run_dir = run_dir
        self.console = console or Console()
        self._bar: LiveProgress | None = None
        self._tracking: TrackingObserver | None = None
        self._driving = False  # the job's tasks have started running (its folder then holds its state)

    # ----------------------------------------------------------- display
    def metric(self, record: dict) -> None:
        self._tracking.metric(record)  # metrics.jsonl and the trackers, as it happens

    def step(self, progress: Progress, stats: dict[str, float]) -> None:
        if self._bar is not None:
            self._bar.update(progress.step_in_stage, _bar_text(stats["reward_mean"], progress.after))

    def stage_started(self, stage: int, progress: Progress, selection) -> None:
        cur, n = self.spec.curriculum, len(selection.prompt_ids)
        self.console.print(
            f"stage {stage}: {cur.selector} selected {n} of {len(self.data.pool)} prompts"
            f" ({selection.eligible} eligible){'; ' + selection.note if selection.note else ''}"
        )
        if not n:
            self.console.print(f"[yellow]stage {stage}: no eligible prompt to train on; skipping its steps[/]")
            return
        self._close_bar()
        self._bar = LiveProgress(self.console, f"stage {stage} GRPO", cur.steps_per_stage, progress.step_in_stage,
                                 unit="step", text=_bar_text(None, progress.after))

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def _phase_bar(self, kind: str, total: int) -> None:
        self._close_bar()
        label = {TaskKind.OFFLINE: "offline rollouts (parts)", TaskKind.PROJECT: "POPI projection (parts)"}[kind]
        self._bar = LiveProgress(self.console, label, total, transient=True)

    # ----------------------------------------------------------- run
    def run(self) -> RunResult:
        """Run the job, or continue it where a killed run of it stopped.

        Nothing is written to the run folder until the spec, its device, model and data are valid:
        a refused job leaves no folder behind that would then refuse the corrected spec."""
        spec, console = self.spec, self.console
        resolve_device(spec.device)  # a device this machine lacks is refused before the folder is touched
        check_run_dir(spec, self.run_dir)
        check_backends(spec)  # a tracker whose client is not installed (the `tracking` extra)
        resolve_model_path(spec.model.path, _sft_progress(console))  # build the built-in model with a visible bar
        job_data(spec)  # a missing data file or a bad row is refused here (the controller reuses what it loads)
        created = _missing_folders(self.run_dir)
        prepare_run_dir(spec, self.run_dir)
        self._driving = False
        try:
            return self._run()
        except InputError:
            # Refused before the job ran (its data or settings, found while starting): the folder
            # this call created goes too. A folder that was there already is never removed.
            if not self._driving:
                _remove_created(created)
            raise

    def _run(self) -> RunResult:
        spec, console = self.spec, self.console
        start = time.perf_counter()
        server = RedisServer(self.run_dir / "redis").start()
        try:
            client = server.client()
            # One consumer, so nothing is ever reclaimed from a live worker; a killed run's task
            # comes back to the same consumer name when the run is started again.
            bus = TaskBus(client, visibility_timeout_s=24 * 3600, max_attempts=1000)
            jobs = JobRegistry(client)
            store = LocalStore(self.run_dir / "store")
            controller = Controller(bus, jobs, store)
            fresh = controller.submit(spec)
            self.data = d = controller.view(spec.name).data
            console.print(
                f"[bold]{spec.name}[/]: pool {len(d.pool)} prompts"
                + (f" ({d.decontaminated} dropped: also in an evaluation set)" if d.decontaminated else "")
                + f", validation {', '.join(f'{k}={len(v)}' for k, v in d.validation.items()) or '-'}"
                + (f", untargeted {', '.join(f'{k}={len(v)}' for k, v in d.untargeted.items())}" if d.untargeted else "")
                + f"; {spec.total_steps} GRPO steps x {spec.rl.batch_prompts} prompts x {spec.rollout.n} responses"
            )
            rec = jobs.get(spec.name)
            if not fresh and rec["phase"] == Phase.FAILED:
                console.print(f"[bold]continuing[/] the failed job from the start of stage {rec['stage']} "
                              f"(it failed: {rec.get('error') or '?'})")
                controller.reopen(spec.name)
                rec = jobs.get(spec.name)
            if not fresh and rec["phase"] not in TERMINAL:
                console.print(f"[bold]resuming[/] at step {rec['step']} ({rec['phase']}, stage {rec['stage']})")
            # metrics.jsonl and tb/ from the stored records (a killed run may have logged a step it never
            # saved), then each record as it is logged; the trackers continue the run's W&B / MLflow run.
            self._tracking = local_tracking(spec, self.run_dir, run_key(spec.name, rec.get("created")),
                                            [] if fresh else stored_records(store, spec.name),
                                            warn=lambda m: console.print(f"[yellow]warning:[/] {m}"))
            try:
                executors = JobExecutors(store)
                # The controller's influence engine has no model: a stored part it finds unreadable
                # is recomputed by the part's task handler, here.
                influence = controller.view(spec.name).influence
                influence.warn = job_warning(jobs, spec.name)
                influence.recompute = TaskRecompute(executors, spec.name, TaskContext(jobs))
                worker = Worker(list(KINDS), bus, jobs, executors, "embedded", observer=self, fail_fast=True)
                try:
                    self._driving = True
                    self._drive(controller, worker, jobs)
                finally:
                    self._close_bar()
                    executors.close()
            finally:
                self._tracking.close()
            rec = jobs.get(spec.name)
            if rec["phase"] == Phase.FAILED:
                if rec.get("error_kind") == "input":
                    raise InputError(f"job {spec.name}: {rec['error']}")
                raise RuntimeError(f"job {spec.name} failed: {rec['error']}")
            return self._finish(store, time.perf_counter() - start)
        finally:
            server.stop()

    def _drive(self, controller: Controller, worker: Worker, jobs: JobRegistry) -> None:
        job = self.spec.name
        phase_seen, seen_event = None, "0-0"
        while True:
            controller.tick()
            for event in jobs.events(job, after=seen_event):
                seen_event = event["id"]
                if event["kind"] == "warning":
                    self.console.print(f"[yellow]warning:[/] {event['message']}")
            rec = jobs.get(job)
            if rec["phase"] in TERMINAL:
                return
            if rec["phase"] in (TaskKind.OFFLINE, TaskKind.PROJECT) and phase_seen != (rec["phase"], rec["stage"]):
                phase_seen = (rec["phase"], rec["stage"])
                depth = controller.bus.depth(rec["phase"])
                self._phase_bar(rec["phase"], depth["waiting"] + depth["pending"])
            tasks = []
            for kind in KINDS:
                tasks = worker.claim_some(kind, self._parallel(kind), block_ms=None)
                if tasks:
                    break
            if not tasks:
                raise RuntimeError(f"job {job} is stuck in phase {rec['phase']!r}: no task to run and no "
                                   "transition possible (a bug; the run folder keeps its state)")
            worker.process_all(tasks)
            if tasks[0].kind in (TaskKind.OFFLINE, TaskKind.PROJECT) and self._bar is not None:
                self._bar.advance(len(tasks))

    def _parallel(self, kind: str) -> int:
        """Tasks run at once: one per projection actor when the pool does the work, else one."""
        return self.spec.ray.projector_actors if kind == TaskKind.PROJECT and self.spec.executor == "ray" else 1

    def _finish(self, store: LocalStore, seconds: float) -> RunResult:
        spec, job = self.spec, self.spec.name
        key = layout.trainer_state_key(job)
        state = load_trainer_state(store.get(key), key)
        progress = Progress(**state["progress"])
        checkpoint = self.run_dir / "checkpoint"
        shutil.rmtree(checkpoint, ignore_errors=True)
        checkpoint.mkdir()
        prefix = layout.final_checkpoint_prefix(job) + "/"
        for key in store.list(prefix):
            (checkpoint / key[len(prefix):]).write_bytes(store.get(key))
        if progress.stopped_early:
            self.console.print(f"targeted accuracy reached {spec.curriculum.target_accuracy}: stopped after "
                               f"stage {progress.stages[-1]['stage']}")
        result = RunResult(
            run_dir=self.run_dir, steps=progress.step, before=progress.before, after=progress.after,
            targeted=list(self.data.validation), wallclock_s=seconds, stages=progress.stages,
        )
        (self.run_dir / "summary.json").write_text(json.dumps(result.to_json(), indent=2))
        plot_run(self.run_dir)
        return result


def _fmt_acc(results: dict[str, dict[str, float]]) -> str:
    return " ".join(f"{k}={v['accuracy']:.2f}" for k, v in results.items()) or "-"


def _bar_text(reward: float | None, after: dict[str, dict[str, float]]) -> str:
    return f"reward {'-' if reward is None else f'{reward:.2f}'}  acc {_fmt_acc(after)}"


def run_job(spec: JobSpec, run_dir: Path, console: Console | None = None) -> RunResult:
    return EmbeddedRun(spec, run_dir, console).run()
