"""One curriculum stage of training, the same under every executor.

`run_train_task` is what a `train` task does, whoever runs it: evaluate at
step 0 on a fresh job, train the stage's remaining steps on its stored
selection, record its summary, store the checkpoint the next stage starts
from. It works on any `StagePolicy` (the inline `Policy`, the Ray
executor's ZeRO-3 ranks) and keeps its progress in a `TrainerJournal`.

The trainer saves its whole state (weights, optimizer, progress, metrics)
to the store after every step, so a trainer killed mid-stage resumes after
its last completed step, wherever it restarts. The state is read back with
`torch.load(weights_only=True)`: tensors and plain data only, so that write
access to the store never means running code in the trainer.
"""

from __future__ import annotations

import io
import json
import pickle
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict
from typing import Any, Protocol

import torch

from cropi.curriculum import layout
from cropi.curriculum.sampling import Draw, EpochSampler, Log, draws_per_step
from cropi.curriculum.selection import stored_selection
from cropi.curriculum.selectors import Selection
from cropi.curriculum.state import Progress
from cropi.data.sources import JobData
from cropi.data.types import Prompt
from cropi.evaluation import targeted_mean
from cropi.runtime.jobs import JobRegistry
from cropi.runtime.store import ObjectStore
from cropi.runtime.tasks import Cancelled, RunObserver
from cropi.spec import JobSpec


class UnsafeTrainerState(RuntimeError):
    """A stored trainer state holds more than tensors and plain data: it is refused, not unpickled."""


def load_trainer_state(data: bytes, key: str) -> dict[str, Any]:
    """A trainer state as `TrainerJournal.commit` stores it (tensors, optimizer state dicts, plain
    data). Pickled objects are refused (`UnsafeTrainerState`): unpickling them could run code."""
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UnsafeTrainerState(
            f"trainer state {key!r} holds objects other than tensors and plain data: refused, since loading "
            "it could run code (cropi never writes such a state: something else put it in the store)") from err
    if not isinstance(state, dict) or not {"progress", "records"} <= state.keys():
        raise UnsafeTrainerState(f"trainer state {key!r} is not a trainer state (no progress or records)")
    return state


class StagePolicy(Protocol):
    """What the stage loop needs of the policy it trains."""

    spec: JobSpec

    def evaluate(self, data: JobData, step: int, log: Log) -> dict[str, dict[str, float]]: ...

    def train_step(self, step: int, draw: Draw) -> dict[str, float]: ...

    def reset_optimizer(self) -> None: ...


def stage_prompts(data: JobData, selection: Selection) -> list[Prompt]:
    by_id = {p.id: p for p in data.pool}
    return [by_id[i] for i in selection.prompt_ids]


def train_stage(policy: StagePolicy, data: JobData, progress: Progress, selection: Selection, log: Log,
                save: Callable[[Progress], None], on_step: Callable[[dict], None] | None = None) -> None:
    """Run the remaining steps of stage `progress.stage`, saving after each completed step."""
    spec, cur, stage = policy.spec, policy.spec.curriculum, progress.stage
    prompts = stage_prompts(data, selection)
    if not prompts:
        return
    sampler = EpochSampler(prompts, spec.rl.batch_prompts, seed=f"{spec.seed}-stage{stage}")
    # Each step owns a fixed range of the sampler's batches, so that a resumed
    # run draws the same ones whatever an earlier step consumed.
    per_step = draws_per_step(spec)
    while progress.step_in_stage < cur.steps_per_stage:
        i, step = progress.step_in_stage, progress.step + 1
        stats = policy.train_step(step, lambda d, i=i: sampler.batch(i * per_step + d))
        samples = stats.pop("samples", [])
        log("train", step, stage=stage, **stats)
        if samples:
            log("samples", step, stage=stage, samples=samples)
        if step % spec.eval.every == 0 or i == cur.steps_per_stage - 1:
            progress.after = policy.evaluate(data, step, log)
        progress.step, progress.step_in_stage = step, i + 1
        save(progress)
        if on_step:
            on_step(stats)


def finish_stage(policy: StagePolicy, data: JobData, progress: Progress, selection: Selection) -> None:
    """Record the stage's summary and move `progress` to the next stage (the caller saves it)."""
    cur, stage = policy.spec.curriculum, progress.stage
    selected = len(selection.prompt_ids)
    progress.stages.append({
        "stage": stage, "selected": selected, "eligible": selection.eligible,
        "note": selection.note or ("" if selected else "skipped: nothing eligible"),
        "before": progress.stage_before, "after": progress.after, "end_step": progress.step,
    })
    if cur.reset_optimizer:
        policy.reset_optimizer()
    if cur.target_accuracy is not None and targeted_mean(progress.after, list(data.validation)) >= cur.target_accuracy:
        progress.stopped_early = True
    progress.stage, progress.step_in_stage, progress.stage_before = stage + 1, 0, progress.after


class TrainerJournal:
    """The trainer's progress and metric records, persisted to the store with each saved step.

    One per train task. `commit` stores the trainer state (the caller's weights and
    optimizer, or where it put them, plus progress and records), rewrites the
    metrics files of the stages that changed, counts the new steps exactly once
    and stops the task when the job was cancelled.
    """

    def __init__(self, store: ObjectStore, jobs: JobRegistry, job: str, heartbeat: Callable[[], None],
                 observer: RunObserver | None = None, keeper: bool = True):
        """`keeper=False`: follow progress without storing or reporting anything (the other ranks
        of a distributed trainer, whose rank 0 keeps the journal)."""
        self.keeper = keeper
        self.store, self.jobs, self.job = store, jobs, job
        self.heartbeat, self.observer = heartbeat, observer or RunObserver()
        self.progress: Progress | None = None
        self.records: dict[str, list[dict]] = {}
        self._dirty: set[str] = set()
        self._counted = 0
        # Called with (progress, records) when a stage has ended and is saved (the store's report).
        self.on_stage_end: Callable[[Progress, dict[str, list[dict]]], None] | None = None

    def stage_ended(self, progress: Progress) -> None:
        if self.keeper and self.on_stage_end is not None:
            self.on_stage_end(progress, self.records)

    def load(self) -> dict | None:
        """The stored trainer state (None on a fresh job); restores progress and records from it."""
        key = layout.trainer_state_key(self.job)
        if not self.store.exists(key):
            return None
        state = load_trainer_state(self.store.get(key), key)
        self.progress, self.records = Progress(**state["progress"]), state["records"]
        self._counted = self.progress.step
        # All stages: the previous process may have died between saving its state and writing the files.
        self._dirty = set(self.records)
        return state

    def metric(self, kind: str, step: int, **values: Any) -> None:
        stage = self.progress.stage if self.progress else 0
        record = {"kind": kind, "step": step, **values}
        self.records.setdefault(str(stage), []).append(record)
        self._dirty.add(str(stage))
        if not self.keeper:
            return
        self.observer.metric(record)
        if kind == "eval_summary":
            self.jobs.update(self.job, metrics=values)  # the step is recorded when it is saved
            self.jobs.event(self.job, "eval", f"step {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in values.items()),
                            step=step, **values)

    def commit(self, progress: Progress, trainer_state: dict[str, Any]) -> None:
        self.progress = progress
        if not self.keeper:
            return
        buf = io.BytesIO()
        # Progress and records as plain JSON values (a numpy scalar among them would not load back
        # with weights_only); the caller's part is tensors and state dicts.
        plain = json.loads(json.dumps({"progress": asdict(progress), "records": self.records}))
        torch.save({**trainer_state, **plain}, buf)
        self.store.put(layout.trainer_state_key(self.job), buf.getvalue())
        for st in sorted(self._dirty):
            self.store.put(layout.stage_metrics_key(self.job, st),
                           "".join(json.dumps(r) + "\n" for r in self.records[st]).encode())
        self._dirty.clear()
        for step in range(self._counted + 1, progress.step + 1):
            self.jobs.count_step(self.job, step)
        if progress.step > self._counted:
            self.jobs.update(self.job, step=progress.step)
        self._counted = max(self._counted, progress.step)
        self.heartbeat()
        if self.jobs.cancel_requested(self.job):
            raise Cancelled(self.job)


def run_train_task(policy: StagePolicy, data: JobData, journal: TrainerJournal, stage: int,
                   save: Callable[[Progress], None], put_checkpoint: Callable[[str], None]) -> dict:
    """One stage of training on `policy`, resumable; `put_checkpoint(prefix)` stores its HF folder there."""
    spec, store, job = policy.spec, journal.store, journal.job
    progress = journal.progress
    if progress is None:
        progress = journal.progress = Progress()
        progress.before = progress.after = progress.stage_before = policy.evaluate(data, 0, journal.metric)
        save(progress)
    if progress.stage > stage:  # a re-delivered task whose work was saved already
        journal.stage_ended(progress)  # its report, should the process have died before writing it
        return train_result(progress, stage)
    if progress.stage < stage:
        raise RuntimeError(f"job {job}: trainer is at stage {progress.stage}, asked for stage {stage}")
    selection = stored_selection(store, spec, stage)
    if selection is None:
        raise RuntimeError(f"job {job}: stage {stage} has no stored selection")
    observer = journal.observer
    observer.stage_started(stage, progress, selection)
    if progress.step_in_stage == 0:
        journal.metric("selection", progress.step, **selection_stats(data, stage, selection))
    train_stage(policy, data, progress, selection, journal.metric, save,
                on_step=lambda stats: observer.step(progress, stats))
    finish_stage(policy, data, progress, selection)
    if progress.stage < spec.curriculum.stages and not progress.stopped_early:
        put_checkpoint(layout.checkpoint_prefix(job, progress.stage))
    else:
        put_checkpoint(layout.final_checkpoint_prefix(job))
    save(progress)
    journal.stage_ended(progress)
    return train_result(progress, stage)


MIX_KEYS = ("skill", "data_source")  # the first that the selected prompts carry counts them


def selection_stats(data: JobData, stage: int, selection: Selection) -> dict[str, Any]:
    """A stage's `selection` record: how many were selected of how many eligible, their mix by
    skill (built-in tasks) or data_source (file data), and what choosing them took."""
    prompts = stage_prompts(data, selection)
    stats: dict[str, Any] = {"stage": stage, "selected": len(prompts), "eligible": selection.eligible,
                             "seconds": selection.seconds}
    key = next((k for k in MIX_KEYS if any(k in p.meta for p in prompts)), None)
    if key is not None:
        stats["mix_key"] = key
        stats["mix"] = dict(sorted(Counter(str(p.meta.get(key, "-")) for p in prompts).items()))
    return stats


def train_result(progress: Progress, stage: int) -> dict:
    """A train task's result: where the stage ended and whether the job stops there."""
    summary = next(s for s in progress.stages if s["stage"] == stage)
    last = progress.stages[-1]["stage"] == stage
    return {"stage": stage, "end_step": summary["end_step"], "stopped_early": progress.stopped_early and last,
            "summary": summary}
