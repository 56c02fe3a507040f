"""The services end to end: controller, rollout, projector and trainer as
separate processes on a real redis-server and a shared store folder reach the
same selections and the same training metrics as `cropi run`."""

import json

from cropi.runtime.jobs import JobRegistry

from .services import JOB, comparable_metrics, stored_selections, submit


def test_services_reach_the_embedded_runs_selections_and_metrics(cluster, embedded_reference, tmp_path,
                                                                   redis_server):
    cluster.start_all()
    submit(cluster)
    status = cluster.wait_phase(JOB["name"])
    assert status["phase"] == "done", status
    assert status["step"] == 6

    got = stored_selections(tmp_path / "store", JOB["name"])
    want = stored_selections(embedded_reference / "store", JOB["name"])
    assert got == want
    assert got[0]["eligible"] > 0, "the test job must have something to select"

    service_metrics = []
    for s in range(2):
        path = tmp_path / "store" / "jobs" / JOB["name"] / "stages" / str(s) / "metrics.jsonl"
        service_metrics += [json.loads(line) for line in path.read_text().splitlines()]
    embedded = [json.loads(line) for line in (embedded_reference / "metrics.jsonl").read_text().splitlines()]
    assert comparable_metrics(service_metrics) == comparable_metrics(embedded)

    events = [json.loads(line) for line in
              (tmp_path / "store" / "jobs" / JOB["name"] / "events.jsonl").read_text().splitlines()]
    assert events[0]["kind"] == "submitted" and events[-1]["kind"] == "done"
    assert sum(e["kind"] == "stage_done" for e in events) == 2

    counts = JobRegistry(redis_server.client()).step_counts(JOB["name"])
    assert counts == {step: 1 for step in range(1, 7)}, "every training step exactly once"
