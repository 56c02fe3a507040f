"""The vocabulary shared by the controller, the workers and the executors:
task kinds, the typed payload of each task, and the executor interface a
worker hands its tasks to (a job's phases are in `jobs.py`).

    task      service     payload                      an executor's method
    offline   rollout     OfflineTask(job, set, part)  offline(task, ctx)
    project   projector   ProjectTask(job, stage, set, part)  project(task, ctx)
    train     trainer     TrainTask(job, stage)        train(task, ctx)

On the bus a payload is a JSON object with exactly these fields; task ids
are deterministic, so a second submit of the same task is a no-op.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from enum import StrEnum
from typing import Any, Protocol

from cropi.runtime.jobs import JobRegistry


class TaskKind(StrEnum):
    OFFLINE = "offline"
    PROJECT = "project"
    TRAIN = "train"


SERVICE_KINDS: dict[str, list[TaskKind]] = {
    "rollout": [TaskKind.OFFLINE], "projector": [TaskKind.PROJECT], "trainer": [TaskKind.TRAIN],
}


def offline_task_id(job: str, set_name: str, index: int) -> str:
    return f"{job}:offline:{set_name}:{index}"


def project_task_id(job: str, stage: int, set_name: str, index: int) -> str:
    return f"{job}:project:{stage}:{set_name}:{index}"


def train_task_id(job: str, stage: int) -> str:
    return f"{job}:train:{stage}"


@dataclass(frozen=True)
class OfflineTask:
    """Sample and store one part of a job's offline trajectories."""

    job: str
    set: str
    part: int
    kind = TaskKind.OFFLINE

    @property
    def task_id(self) -> str:
        return offline_task_id(self.job, self.set, self.part)


@dataclass(frozen=True)
class ProjectTask:
    """POPI-project one part at the policy of a stage's start."""

    job: str
    stage: int
    set: str
    part: int
    kind = TaskKind.PROJECT

    @property
    def task_id(self) -> str:
        return project_task_id(self.job, self.stage, self.set, self.part)


@dataclass(frozen=True)
class TrainTask:
    """Run one stage's GRPO steps, then store the next stage's checkpoint."""

    job: str
    stage: int
    kind = TaskKind.TRAIN

    @property
    def task_id(self) -> str:
        return train_task_id(self.job, self.stage)


AnyTask = OfflineTask | ProjectTask | TrainTask
_PAYLOADS: dict[str, type] = {TaskKind.OFFLINE: OfflineTask, TaskKind.PROJECT: ProjectTask,
                              TaskKind.TRAIN: TrainTask}


def to_payload(task: AnyTask) -> dict[str, Any]:
    return asdict(task)


def from_payload(kind: str, payload: dict[str, Any]) -> AnyTask:
    """The typed task of a bus payload; ValueError naming the kind and the field that is wrong."""
    try:
        cls = _PAYLOADS[kind]
    except KeyError:
        raise ValueError(f"unknown task kind {kind!r}") from None
    values = {}
    for f in fields(cls):
        if f.name not in payload:
            raise ValueError(f"{kind} task: payload has no {f.name!r}")
        want = int if f.type in ("int", int) else str
        if not isinstance(payload[f.name], want) or isinstance(payload[f.name], bool):
            raise ValueError(f"{kind} task: payload field {f.name!r} must be {want.__name__}")
        values[f.name] = payload[f.name]
    return cls(**values)


class Cancelled(Exception):
    """The job was cancelled while its task ran."""


class Deferred(Exception):
    """The task cannot run yet (a shared service is busy with another job): requeue it, attempt not spent."""


class RunObserver:
    """What a train task reports while it runs (the embedded run's display, a worker's metrics).

    Every method does nothing here; observers override what they show.
    The arguments are the curriculum's own objects (its progress and
    selection), which this layer passes along without reading.
    """

    def stage_started(self, stage: int, progress: Any, selection: Any) -> None:
        pass

    def step(self, progress: Any, stats: dict[str, float]) -> None:
        pass

    def metric(self, record: dict[str, Any]) -> None:
        pass


@dataclass
class TaskContext:
    """What a running task may use besides its payload."""

    jobs: JobRegistry
    heartbeat: Callable[[], None] = lambda: None
    observer: RunObserver = field(default_factory=RunObserver)


class Executor(Protocol):
    """Runs tasks: in the worker's own process (inline) or on Ray. Each method returns the task's result."""

    def offline(self, task: OfflineTask, ctx: TaskContext) -> dict[str, Any]: ...

    def project(self, task: ProjectTask, ctx: TaskContext) -> dict[str, Any]: ...

    def train(self, task: TrainTask, ctx: TaskContext) -> dict[str, Any]: ...

    def close(self) -> None: ...


ExecutorFor = Callable[[str], Executor]  # job name -> the executor that runs its tasks
