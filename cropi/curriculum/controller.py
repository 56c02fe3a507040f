"""The services' controller: the curriculum of `cropi run`, as a stage machine
that emits tasks on the bus and waits for their results.

    queued -> offline -> [project(s) -> select(s) -> train(s)] for each stage -> done

Every transition is written to the job record (Redis, AOF) *before* the
controller acts on it, and every action is idempotent: tasks are submitted
under deterministic ids (a second submit is a no-op) and selections are
stored once. A controller killed anywhere and restarted reads the phase and
carries on; nothing is done twice.

The controller never touches a model. It reads the offline trajectories and
projected gradients the workers stored, and computes selections with the same
code as the embedded run (`selection.select_stage`).

Each tick reads only the jobs still running (`JobRegistry.active`), and a job's
cached view (spec, data, offline trajectories) is freed when it ends. With a
retention period, an ended job's Redis state, its tasks' included, expires
that long after it ended.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from functools import lru_cache

from cropi.curriculum import layout
from cropi.curriculum.data_loader import JobDataLoader
from cropi.curriculum.influence import POOL, InfluenceEngine
from cropi.curriculum.selection import needs_offline, needs_projection, select_stage, stored_selection
from cropi.curriculum.selectors import selection_size
from cropi.data.sources import JobData, load_job_data
from cropi.errors import InputError
from cropi.models.loading import check_model_path
from cropi.runtime.jobs import TERMINAL, JobConflict, JobRegistry, Phase
from cropi.runtime.lease import LeaseLost
from cropi.runtime.queue import INPUT_ERROR_MARK, TaskBus
from cropi.runtime.store import ObjectStore
from cropi.runtime.tasks import AnyTask, OfflineTask, ProjectTask, TrainTask, to_payload
from cropi.spec import JobSpec, parse_spec_yaml

log = logging.getLogger(__name__)
RETRY_DELAYS_S = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 60.0)  # about two minutes before a job fails


class TaskFailed(RuntimeError):
    """A task of the job was dead-lettered: retrying the stage machine cannot help."""


class PartPending(Exception):
    """A stored part was unreadable (or missing) and its task was submitted again: the job waits for it."""


class BusRecompute:
    """The controller's `recompute` source (it has no model): a part found unreadable is recomputed
    by submitting its task again to the workers, whose handlers replace it; meanwhile the job waits
    (PartPending), and reads the part again on a later tick."""

    def __init__(self, bus: TaskBus, jobs: JobRegistry, job: str):
        self.bus, self.jobs, self.job = bus, jobs, job

    def _again(self, task: AnyTask) -> None:
        if self.bus.resubmit(task.kind, task.task_id, to_payload(task)):
            self.jobs.event(self.job, "warning", f"a stored part of task {task.task_id} is unreadable or missing; "
                            "its task runs again", task=task.task_id)
        raise PartPending(task.task_id)

    def offline_part(self, set_name: str, index: int) -> None:
        self._again(OfflineTask(self.job, set_name, index))

    def project_part(self, stage: int, set_name: str, index: int) -> None:
        self._again(ProjectTask(self.job, stage, set_name, index))


@dataclass
class JobView:
    spec: JobSpec
    data: JobData
    influence: InfluenceEngine  # model-less: reads stored parts only


class Controller:
    def __init__(self, bus: TaskBus, jobs: JobRegistry, store: ObjectStore, retention_s: float | None = None,
                 loader: JobDataLoader | None = None, retry_delays_s: tuple[float, ...] = ()):
        self.bus = bus
        # Loads jobs' data off the stage machine's thread, within a time budget (the services);
        # None: in the caller's thread (`cropi run`, one job).
        self.loader = loader
        # A job whose transition raised (not its input, not a dead task) is tried again after each
        # of these delays, then fails (the services: RETRY_DELAYS_S; `cropi run` fails at once, and
        # running it again continues); job -> (failures so far, monotonic time of the next try).
        self.retry_delays_s = retry_delays_s
        self._retry: dict[str, tuple[int, float]] = {}
        self.jobs = jobs
        self.store = store
        # Seconds an ended job's Redis state is kept (None: forever, as in `cropi run`).
        self.retention_s = retention_s
        if retention_s is not None:
            jobs.retention_s = retention_s
        self._views: dict[str, JobView] = {}
        # (job, phase, stage) whose tasks this controller has submitted. Empty after a restart, so
        # a restarted controller re-submits once (a no-op for tasks already there), not every tick.
        self._emitted: set[tuple[str, str, int]] = set()

    # ------------------------------------------------------------ submit
    def submit(self, spec: JobSpec) -> bool:
        """Register the job and store its spec; True if new (a same-spec resubmit is a no-op)."""
        text = spec.to_yaml()
        key = layout.spec_key(spec.name)
        stored = self.store.get(key).decode() if self.store.exists(key) else None
        if stored is not None and stored != text:
            # Redis forgot the name (its record expired, or Redis was wiped) but the store kept the
            # job's artifacts: a different spec would silently run on them.
            raise JobConflict(f"job {spec.name!r} ran before with a different spec (its artifacts are in the "
                              "store); choose another name")
        # Redis decides, atomically, which of concurrent submits of a name is the job; only then is
        # the spec stored, so that the one stored is the one accepted, never a refused one.
        created = self.jobs.create(spec.name, text)
        if stored is None:
            self.store.put(key, text.encode())  # the accepted spec (a same-spec resubmit writes the same bytes)
        if created:  # a name Redis no longer knew (wiped, restored): nothing of it is submitted there
            self._forget(spec.name)
        return created

    def reopen(self, job: str) -> int:
        """Continue a failed job from the start of the stage it failed in; returns that stage.

        What came before is in the store (offline parts, gradients, selections, the trainer's
        state) and every phase is idempotent (tasks under their ids, selections stored once), so
        nothing done is redone: the phases up to where it failed pass through, and the tasks that
        failed for good are submitted again.
        """
        rec = self.jobs.get(job)
        if rec is None or rec["phase"] != Phase.FAILED:
            raise JobConflict(f"job {job!r} is {rec['phase'] if rec else 'unknown'}; only a failed job continues")
        key = layout.spec_key(job)
        spec = parse_spec_yaml(self.store.get(key).decode(), key)
        stage = rec["stage"]
        phase = (Phase.QUEUED if stage == 0 else
                 Phase.PROJECT if needs_projection(spec, stage) else Phase.SELECT)
        retried = self.bus.retry_failed(job)
        self._forget(job)
        self.jobs.event(job, "continued", f"continuing after a failure, from the start of stage {stage}",
                        stage=stage, retried_tasks=retried)
        self.jobs.update(job, phase=phase, status="running", error="", error_kind="")
        return stage

    def _forget(self, job: str) -> None:
        """Free what this controller holds for `job` (its view: spec, data, offline trajectories)."""
        self._views.pop(job, None)
        self._retry.pop(job, None)
        if self.loader is not None:
            self.loader.forget(job)
        self._emitted = {e for e in self._emitted if e[0] != job}

    def resync(self) -> None:
        """Redis was away (maybe restarted without its last writes): re-submit each phase's tasks once."""
        self._emitted.clear()
        self.jobs.reset_active()

    def view(self, job: str) -> JobView:
        """The job's view, its data loaded here and now (when it is not yet)."""
        if job not in self._views:
            spec = self._stored_spec(job)
            self._views[job] = self._new_view(job, spec, cached_job_data(spec))
        return self._views[job]

    def _tick_view(self, job: str) -> JobView | None:
        """The job's view for the stage machine: with a loader, None while its data loads elsewhere."""
        if job in self._views or self.loader is None:
            return self.view(job)
        loaded = self.loader.ready(job, lambda: self._stored_spec(job))
        if loaded is None:
            return None
        self._views[job] = self._new_view(job, *loaded)
        return self._views[job]

    def _stored_spec(self, job: str) -> JobSpec:
        key = layout.spec_key(job)
        return parse_spec_yaml(self.store.get(key).decode(), key)

    def _new_view(self, job: str, spec: JobSpec, data: JobData) -> JobView:
        influence = InfluenceEngine(spec, self.store)
        influence.recompute = BusRecompute(self.bus, self.jobs, job)
        return JobView(spec, data, influence)

    # ------------------------------------------------------------ machine
    def active_jobs(self) -> list[str]:
        """The jobs not yet ended (one Redis read while none runs, not one per job ever submitted)."""
        return self.jobs.active()

    def tick(self) -> bool:
        """Advance every active job as far as it can go without waiting; True if anything moved."""
        moved = False
        for job in self.active_jobs():
            attempt, not_before = self._retry.get(job, (0, 0.0))
            if time.monotonic() < not_before:
                continue  # backing off after a failure of this controller on the job
            try:
                while self.advance(job):
                    moved = True
                self._retry.pop(job, None)
            except LeaseLost:  # another controller acts now: not this job's failure, stop acting
                raise
            except PartPending:  # a stored part is being recomputed by its task: wait for it
                continue
            except InputError as err:  # the job's own settings or data: said as they are, no traceback
                log.warning("job %s failed: %s", job, err)
                self._end(job, Phase.FAILED, "failed", str(err), error=str(err), error_kind="input")
                moved = True
            except Exception as err:  # a job's failure must not stop the others
                if not isinstance(err, TaskFailed) and attempt < len(self.retry_delays_s):
                    # The store or Redis away, a bug that a restart of the work clears: try again later.
                    delay = self.retry_delays_s[attempt]
                    self._retry[job] = (attempt + 1, time.monotonic() + delay)
                    log.warning("job %s: %s: %s; retrying in %.0f s", job, type(err).__name__, err, delay)
                    self.jobs.event(job, "warning", f"the controller failed on this job ({type(err).__name__}); "
                                    f"retry {attempt + 1} of {len(self.retry_delays_s)} in {delay:.0f} s")
                    continue
                log.exception("job %s failed", job)
                message = f"{type(err).__name__}: {err}"
                self._end(job, Phase.FAILED, "failed", message, error=message)
                moved = True
        return moved

    def advance(self, job: str) -> bool:
        """One transition of `job`, if its current phase is finished; False when it must wait."""
        rec = self.jobs.get(job)
        if rec is None or rec["phase"] in TERMINAL:
            # Ended (maybe by another writer) or expired: no longer active, nothing of it kept here.
            self.jobs.forget_active(job)
            self._forget(job)
            return False
        if rec["cancel"]:
            self._end(job, Phase.CANCELLED, "cancelled", "job cancelled")
            return False
        phase, stage = rec["phase"], rec["stage"]
        v = self._tick_view(job)
        if v is None:  # its data is still loading, off this thread
            return False
        if phase == Phase.QUEUED:
            if needs_offline(v.spec):
                self._set(job, phase=Phase.OFFLINE, status="running")
            else:
                self._enter_stage(job, v, 0)
            return True
        tasks = self._tasks(job, v, phase, stage)
        if tasks:
            self._emit_once(job, phase, stage, tasks)
        if phase == Phase.OFFLINE:
            results = self._results(tasks)
            if results is None:
                return False
            timing = layout.offline_timing_key(job)
            if not self.store.exists(timing):
                seconds = sum(r.get("seconds", 0.0) for r in results.values())
                self.store.put(timing, json.dumps({"seconds": seconds}).encode())
            v.influence.load_offline(v.data)
            self.jobs.event(job, "offline_done", "offline trajectories stored")
            self._check_eligible(job, v)
            self._enter_stage(job, v, 0)
            return True
        if phase == Phase.PROJECT:
            if self._results(tasks) is None:
                return False
            self._set(job, phase=Phase.SELECT)
            return True
        if phase == Phase.SELECT:
            self._select(job, v, stage)
            self._set(job, phase=Phase.TRAIN)
            return True
        if phase == Phase.TRAIN:
            results = self._results(tasks)
            if results is None:
                return False
            r = results[tasks[0].task_id]
            self.jobs.event(job, "stage_done", f"stage {stage} done at step {r['end_step']}", **r["summary"])
            if r["stopped_early"] or stage + 1 >= v.spec.curriculum.stages:
                self._end(job, Phase.DONE, "succeeded", f"job {job} finished after {r['end_step']} steps",
                          step=r["end_step"])
            else:
                self._enter_stage(job, v, stage + 1)
            return True
        raise RuntimeError(f"job {job}: unknown phase {phase!r}")

    # ------------------------------------------------------------ helpers
    def _set(self, job: str, **fields) -> None:
        self.jobs.update(job, **fields)

    def _end(self, job: str, phase: str, status: str, message: str, **fields) -> None:
        """A terminal transition; the job's events are archived beside its artifacts (docs/design.md §5).

        The archive is written before the phase changes, so that a job seen as
        ended has its events stored (a client may stop the services then).
        """
        self.jobs.event(job, phase, message)
        events = self.jobs.events(job, count=1_000_000)
        self.store.put(layout.events_key(job), "".join(json.dumps(e) + "\n" for e in events).encode())
        self._set(job, phase=phase, status=status, **fields)  # leaves the active set; expiry starts
        if self.jobs.retention_s:
            self.bus.expire_job(job, self.jobs.retention_s)
        self._forget(job)

    def _enter_stage(self, job: str, v: JobView, stage: int) -> None:
        phase = Phase.PROJECT if needs_projection(v.spec, stage) else Phase.SELECT
        self._set(job, phase=phase, stage=stage, status="running")
        self.jobs.event(job, "stage_started", f"stage {stage} started", stage=stage)

    def _check_eligible(self, job: str, v: JobView) -> None:
        """No eligible pool prompt: an error saying what to change. Fewer than a stage keeps: a warning."""
        groups = v.influence.offline[POOL]
        eligible = sum(g.eligible for g in groups)
        wanted = selection_size(len(groups), v.spec.curriculum.select_ratio)
        if eligible == 0:
            raise InputError(
                f"no pool prompt is eligible: all {len(groups)} got equal rewards on their {v.spec.offline.n_pool} "
                "offline responses, so none has a gradient to select by. Raise offline.temperature or "
                "offline.n_pool, use easier data, or check the verifier (does the model's answer format match it?)")
        if eligible < wanted:
            self.jobs.event(job, "warning", f"only {eligible} of {len(groups)} pool prompts are eligible (mixed "
                            f"offline rewards); each stage wants {wanted}", eligible=eligible, wanted=wanted)

    def _tasks(self, job: str, v: JobView, phase: str, stage: int) -> list[AnyTask]:
        """The tasks of a phase that runs on the workers (none for the others)."""
        if phase == Phase.OFFLINE:
            return [OfflineTask(job, set_name, index) for set_name, index in v.influence.offline_parts(v.data)]
        if phase == Phase.PROJECT:
            if not v.influence.offline:
                v.influence.load_offline(v.data)
            return [ProjectTask(job, stage, set_name, index) for set_name, index in v.influence.stage_parts(stage)]
        if phase == Phase.TRAIN:
            return [TrainTask(job, stage)]
        return []

    def _emit_once(self, job: str, phase: str, stage: int, tasks: list[AnyTask]) -> None:
        """Submit the phase's tasks (after the phase was persisted; ids are deterministic)."""
        if (job, phase, stage) in self._emitted:
            return
        for task in tasks:
            self.bus.submit(task.kind, task.task_id, to_payload(task))
        self._emitted.add((job, phase, stage))

    def _select(self, job: str, v: JobView, stage: int) -> None:
        selection = stored_selection(self.store, v.spec, stage)
        if selection is None:
            if needs_offline(v.spec) and not v.influence.offline:
                v.influence.load_offline(v.data)
            # The projectors' time is part of what this selection cost (wall-clock accounting).
            projection_s = 0.0
            if needs_projection(v.spec, stage):
                for task in self._tasks(job, v, Phase.PROJECT, stage):
                    projection_s += (self.bus.result(task.task_id) or {}).get("seconds", 0.0)
            selection = select_stage(v.spec, v.data, self.store, v.influence, stage, extra_seconds=projection_s)
        self.jobs.event(job, "selected", f"stage {stage}: {v.spec.curriculum.selector} selected "
                        f"{len(selection.prompt_ids)} of {len(v.data.pool)} prompts ({selection.eligible} eligible)",
                        stage=stage, selected=len(selection.prompt_ids), eligible=selection.eligible)

    def _results(self, tasks: list[AnyTask]) -> dict[str, dict] | None:
        """Every task's result by id, or None while any is missing; a dead-lettered task fails the job."""
        task_ids = [t.task_id for t in tasks]
        failures, results = self.bus.outcomes(task_ids)  # one round trip, however many parts
        for task_id in task_ids:
            if task_id in failures:
                error = failures[task_id]
                if error.startswith(INPUT_ERROR_MARK):  # the job's input: the user's to fix, said as it is
                    raise InputError(f"task {task_id}: {error[len(INPUT_ERROR_MARK):]}")
                raise TaskFailed(f"task {task_id} failed for good: {error}")
        if len(results) < len(task_ids):
            return None
        return results


def check_job(spec: JobSpec) -> None:
    """What a submitted job must pass before it is accepted, the checks `cropi run` makes before it
    starts: its model can load (a known built-in and its options, a HF folder, or a hub id) and its
    data loads under this process's data policy, templates and verifiers included. Nothing is
    built or trained; the data loaded is cached for the job's first tick."""
    check_model_path(spec.model.path)
    cached_job_data(spec)


@lru_cache(maxsize=8)
def _job_data_cached(spec_yaml: str) -> JobData:
    return load_job_data(parse_spec_yaml(spec_yaml, "<job>"))


def cached_job_data(spec: JobSpec) -> JobData:
    return _job_data_cached(spec.to_yaml())

