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
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from functools import lru_cache

from cropi.curriculum.selection import (
    needs_offline,
    needs_projection,
    offline_timing_key,
    select_stage,
    stored_selection,
)
from cropi.data.sources import JobData, load_job_data
from cropi.influence.engine import InfluenceEngine
from cropi.runtime.jobs import TERMINAL, JobRegistry
from cropi.runtime.queue import TaskBus
from cropi.runtime.store import ObjectStore
from cropi.spec import JobSpec, parse_spec_yaml

log = logging.getLogger(__name__)

OFFLINE, PROJECT, TRAIN = "offline", "project", "train"


def spec_key(job: str) -> str:
    return f"jobs/{job}/spec.yaml"


def offline_task_id(job: str, set_name: str, index: int) -> str:
    return f"{job}:offline:{set_name}:{index}"


def project_task_id(job: str, stage: int, set_name: str, index: int) -> str:
    return f"{job}:project:{stage}:{set_name}:{index}"


def train_task_id(job: str, stage: int) -> str:
    return f"{job}:train:{stage}"


@dataclass
class JobView:
    spec: JobSpec
    data: JobData
    influence: InfluenceEngine  # model-less: reads stored parts only


class Controller:
    def __init__(self, bus: TaskBus, jobs: JobRegistry, store: ObjectStore):
        self.bus = bus
        self.jobs = jobs
        self.store = store
        self._views: dict[str, JobView] = {}
        # (job, phase, stage) whose tasks this controller has submitted. Empty after a restart, so
        # a restarted controller re-submits once (a no-op for tasks already there), not every tick.
        self._emitted: set[tuple[str, str, int]] = set()

    # ------------------------------------------------------------ submit
    def submit(self, spec: JobSpec) -> bool:
        """Register the job and store its spec; True if new (a same-spec resubmit is a no-op)."""
        text = spec.to_yaml()
        if not self.store.exists(spec_key(spec.name)):
            self.store.put(spec_key(spec.name), text.encode())
        created = self.jobs.create(spec.name, text)
        if created:  # a name Redis no longer knew (wiped, restored): nothing of it is submitted there
            self._views.pop(spec.name, None)
            self._emitted = {e for e in self._emitted if e[0] != spec.name}
        return created

    def resync(self) -> None:
        """Redis was away (maybe restarted without its last writes): re-submit each phase's tasks once."""
        self._emitted.clear()

    def view(self, job: str) -> JobView:
        if job not in self._views:
            spec = parse_spec_yaml(self.store.get(spec_key(job)).decode(), spec_key(job))
            self._views[job] = JobView(spec, _job_data(spec), InfluenceEngine(spec, self.store))
        return self._views[job]

    # ------------------------------------------------------------ machine
    def active_jobs(self) -> list[str]:
        return [n for n in self.jobs.names() if (self.jobs.get(n) or {}).get("phase") not in TERMINAL]

    def tick(self) -> bool:
        """Advance every active job as far as it can go without waiting; True if anything moved."""
        moved = False
        for job in self.active_jobs():
            try:
                while self.advance(job):
                    moved = True
            except Exception as err:  # a job's failure must not stop the others
                log.exception("job %s failed", job)
                message = f"{type(err).__name__}: {err}"
                self._end(job, "failed", "failed", message, error=message)
                moved = True
        return moved

    def advance(self, job: str) -> bool:
        """One transition of `job`, if its current phase is finished; False when it must wait."""
        rec = self.jobs.get(job)
        if rec is None or rec["phase"] in TERMINAL:
            return False
        if rec["cancel"]:
            self._end(job, "cancelled", "cancelled", "job cancelled")
            return False
        phase, stage = rec["phase"], rec["stage"]
        v = self.view(job)
        if phase == "queued":
            if needs_offline(v.spec):
                self._set(job, phase=OFFLINE, status="running")
            else:
                self._enter_stage(job, v, 0)
            return True
        if phase in (OFFLINE, PROJECT, TRAIN):
            self._emit_once(job, v, phase, stage)
        if phase == OFFLINE:
            results = self._results([offline_task_id(job, s, i) for s, i in v.influence.offline_parts(v.data)])
            if results is None:
                return False
            if not self.store.exists(offline_timing_key(v.spec)):
                seconds = sum(r.get("seconds", 0.0) for r in results.values())
                self.store.put(offline_timing_key(v.spec), json.dumps({"seconds": seconds}).encode())
            v.influence.load_offline(v.data)
            self.jobs.event(job, "offline_done", "offline trajectories stored")
            self._enter_stage(job, v, 0)
            return True
        if phase == PROJECT:
            if self._results([project_task_id(job, stage, s, i) for s, i in v.influence.stage_parts()]) is None:
                return False
            self._set(job, phase="select")
            return True
        if phase == "select":
            self._select(job, v, stage)
            self._set(job, phase=TRAIN)
            return True
        if phase == TRAIN:
            results = self._results([train_task_id(job, stage)])
            if results is None:
                return False
            r = results[train_task_id(job, stage)]
            self.jobs.event(job, "stage_done", f"stage {stage} done at step {r['end_step']}", **r["summary"])
            if r["stopped_early"] or stage + 1 >= v.spec.curriculum.stages:
                self._end(job, "done", "succeeded", f"job {job} finished after {r['end_step']} steps",
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
        self.store.put(f"jobs/{job}/events.jsonl", "".join(json.dumps(e) + "\n" for e in events).encode())
        self._set(job, phase=phase, status=status, **fields)

    def _enter_stage(self, job: str, v: JobView, stage: int) -> None:
        if needs_projection(v.spec, stage):
            self._set(job, phase=PROJECT, stage=stage, status="running")
        else:
            self._set(job, phase="select", stage=stage, status="running")
        self.jobs.event(job, "stage_started", f"stage {stage} started", stage=stage)

    def _emit_once(self, job: str, v: JobView, phase: str, stage: int) -> None:
        """Submit the phase's tasks (after the phase was persisted; ids are deterministic)."""
        if (job, phase, stage) in self._emitted:
            return
        if phase == OFFLINE:
            for set_name, index in v.influence.offline_parts(v.data):
                self.bus.submit(OFFLINE, offline_task_id(job, set_name, index),
                                {"job": job, "set": set_name, "part": index})
        elif phase == PROJECT:
            if not v.influence.offline:
                v.influence.load_offline(v.data)
            for set_name, index in v.influence.stage_parts():
                self.bus.submit(PROJECT, project_task_id(job, stage, set_name, index),
                                {"job": job, "stage": stage, "set": set_name, "part": index})
        else:
            self.bus.submit(TRAIN, train_task_id(job, stage), {"job": job, "stage": stage})
        self._emitted.add((job, phase, stage))

    def _select(self, job: str, v: JobView, stage: int) -> None:
        selection = stored_selection(self.store, v.spec, stage)
        if selection is None:
            if needs_offline(v.spec) and not v.influence.offline:
                v.influence.load_offline(v.data)
            # The projectors' time is part of what this selection cost (wall-clock accounting).
            projection_s = 0.0
            if needs_projection(v.spec, stage):
                for set_name, index in v.influence.stage_parts():
                    result = self.bus.result(project_task_id(job, stage, set_name, index)) or {}
                    projection_s += result.get("seconds", 0.0)
            selection = select_stage(v.spec, v.data, self.store, v.influence, stage, extra_seconds=projection_s)
        self.jobs.event(job, "selected", f"stage {stage}: {v.spec.curriculum.selector} selected "
                        f"{len(selection.prompt_ids)} of {len(v.data.pool)} prompts ({selection.eligible} eligible)",
                        stage=stage, selected=len(selection.prompt_ids), eligible=selection.eligible)

    def _results(self, task_ids: list[str]) -> dict[str, dict] | None:
        """Every task's result, or None while any is missing; a dead-lettered task fails the job."""
        for task_id in task_ids:
            error = self.bus.failure(task_id)
            if error is not None:
                raise RuntimeError(f"task {task_id} failed for good: {error}")
        results = {}
        for task_id in task_ids:
            r = self.bus.result(task_id)
            if r is None:
                return None
            results[task_id] = r
        return results


@lru_cache(maxsize=8)
def _job_data_cached(spec_yaml: str) -> JobData:
    return load_job_data(parse_spec_yaml(spec_yaml, "<job>"))


def _job_data(spec: JobSpec) -> JobData:
    return _job_data_cached(spec.to_yaml())

