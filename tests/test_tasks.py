"""The task vocabulary: typed payloads round-trip through the bus format, and a malformed
payload is refused naming the kind and the field (a worker then fails that task, not itself)."""

import pytest

from cropi.runtime.tasks import (
    OfflineTask,
    ProjectTask,
    TaskKind,
    TrainTask,
    from_payload,
    to_payload,
)


@pytest.mark.parametrize("task", [OfflineTask("j", "pool", 3), ProjectTask("j", 2, "valid-add1", 0), TrainTask("j", 1)])
def test_a_task_survives_the_bus_format_and_keeps_its_id(task):
    again = from_payload(task.kind, to_payload(task))
    assert again == task and again.task_id == task.task_id


def test_task_ids_are_deterministic_and_name_the_work():
    assert ProjectTask("j", 2, "pool", 7).task_id == "j:project:2:pool:7"
    assert OfflineTask("j", "pool", 0).task_id == "j:offline:pool:0"
    assert TrainTask("j", 1).task_id == "j:train:1"


@pytest.mark.parametrize("kind, payload, message", [
    (TaskKind.TRAIN, {"job": "j"}, "train task: payload has no 'stage'"),
    (TaskKind.PROJECT, {"job": "j", "stage": "2", "set": "pool", "part": 0}, "'stage' must be int"),
    (TaskKind.OFFLINE, {"job": "j", "set": "pool", "part": True}, "'part' must be int"),
    ("evaluate", {"job": "j"}, "unknown task kind 'evaluate'"),
])
def test_a_malformed_payload_is_refused_naming_the_field(kind, payload, message):
    with pytest.raises(ValueError, match=message):
        from_payload(kind, payload)
