"""Metrics as they happen (issue I): TensorBoard events readable while a run
trains, W&B (offline) and MLflow (a file store) read back by their own
libraries, the store's report after each stage of a services-style job, and
progress lines off a terminal. The W&B and MLflow tests need the `tracking`
extra and are skipped without it."""

from __future__ import annotations

import glob
import io
import json
import struct
from pathlib import Path

import pytest
from rich.console import Console
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cropi.curriculum import layout
from cropi.curriculum.controller import Controller
from cropi.embedded import EmbeddedRun, run_job
from cropi.errors import InputError
from cropi.executors import JobExecutors
from cropi.runtime.jobs import TERMINAL, JobRegistry
from cropi.runtime.queue import TaskBus
from cropi.runtime.store import LocalStore
from cropi.runtime.tasks import TaskKind
from cropi.runtime.worker import Worker
from cropi.spec import parse_spec
from cropi.tracking import read_metrics
from cropi.tracking.observer import TrackingObserver, local_tracking

from .jobs import tiny_job

CURRICULUM = {"selector": "random", "stages": 2, "steps_per_stage": 2, "select_ratio": 0.25}


def job(name: str, **sections) -> dict:
    return tiny_job(name=name, curriculum=CURRICULUM, influence=None, **sections)


def scalar_steps(log_dir: Path, tag: str) -> list[int]:
    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return [e.step for e in acc.Scalars(tag)] if tag in acc.Tags()["scalars"] else []


class MidRunProbe(EmbeddedRun):
    """At stage 1's first step, reads what the run has written so far (the run is still going)."""

    seen: dict = {}

    def step(self, progress, stats):
        super().step(progress, stats)
        if progress.stage == 1 and progress.step_in_stage == 1:
            tb = self.run_dir / "tb"
            self.seen = {
                "train": scalar_steps(tb, "train/reward_mean"),
                "eval": scalar_steps(tb, "eval/add1/accuracy"),
                "selected": scalar_steps(tb, "selection/selected"),
                "jsonl": [r["step"] for r in read_metrics(self.run_dir) if r["kind"] == "train"],
                "output": self.console.file.getvalue(),
                "summary": (self.run_dir / "summary.json").exists(),
            }


def test_tensorboard_and_progress_lines_during_the_run(tmp_path, tiny_model):
    out = io.StringIO()
    probe = MidRunProbe(parse_spec(job("tb-live")), tmp_path / "run", Console(file=out, width=60))
    probe.run()
    seen = probe.seen
    assert seen, "the probe never ran"
    assert not seen["summary"], "the run was still going"
    assert seen["train"] == [1, 2, 3]  # stage 0's steps and stage 1's first, in TensorBoard mid-run
    assert seen["eval"] == [0, 2]
    assert seen["selected"] == [0, 2]  # each stage's selection statistics at its start
    assert seen["jsonl"] == [1, 2, 3]
    # Off a terminal: plain lines as the stages go, with step counts and an ETA, never cut off.
    assert "stage 0 GRPO: step 1/2 (50%)" in seen["output"] and "ETA" in seen["output"]
    assert "stage 0 GRPO: step 2/2 (100%)" in seen["output"]
    final = out.getvalue()
    assert "stage 1 GRPO: step 2/2 (100%)" in final and "…" not in final
    # After the run: every step once, in TensorBoard and in metrics.jsonl.
    assert scalar_steps(tmp_path / "run" / "tb", "train/reward_mean") == [1, 2, 3, 4]
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4]
    sel = [r for r in records if r["kind"] == "selection"]
    assert [(r["stage"], r["selected"], r["eligible"]) for r in sel] == [(0, 10, 40), (1, 10, 40)]
    assert sum(sel[0]["mix"].values()) == 10 and sel[0]["mix_key"] == "skill"


def test_a_rebuilt_run_folder_holds_each_stored_record_once(tmp_path):
    spec = parse_spec(job("rebuild"))
    stored = [{"kind": "train", "step": s, "stage": 0, "reward_mean": s / 10} for s in (1, 2)]
    first = local_tracking(spec, tmp_path, "k", [])
    for r in stored + [{"kind": "train", "step": 3, "stage": 0, "reward_mean": 0.3}]:  # step 3: never saved
        first.metric(r)
    first.close()
    again = local_tracking(spec, tmp_path, "k", stored)  # the resumed run: the store holds steps 1-2
    for r in stored:  # a replay of stored records (the Ray executor's) is not written again
        again.metric(r)
    again.metric({"kind": "train", "step": 3, "stage": 0, "reward_mean": 0.35})
    again.close()
    assert [(r["step"], r["reward_mean"]) for r in read_metrics(tmp_path)] == [(1, 0.1), (2, 0.2), (3, 0.35)]
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [(e.step, round(e.value, 2)) for e in acc.Scalars("train/reward_mean")] == [(1, 0.1), (2, 0.2), (3, 0.35)]


def test_a_failing_tracker_is_a_warning_not_a_failed_run(tmp_path):
    class Broken:
        def log(self, kind, step, values):
            raise ConnectionError("server away")

        log_stage = log

        def close(self):
            pass

    warnings = []
    obs = TrackingObserver([Broken()], tmp_path / "m.jsonl", warn=warnings.append)
    obs.metric({"kind": "train", "step": 1, "reward_mean": 0.0})
    obs.metric({"kind": "train", "step": 2, "reward_mean": 0.0})
    obs.close()
    assert len(warnings) == 1 and "server away" in warnings[0]
    assert len((tmp_path / "m.jsonl").read_text().splitlines()) == 2


@pytest.mark.parametrize("tracking, message", [
    ({"backends": ["tensorboard", "tensorboard"]}, "twice"),
    ({"wandb": {"project": "p"}}, "'wandb' is not in tracking.backends"),
    ({"backends": ["mlflow"], "mlflow": {"tracking_uri": "https://me:secret@mlflow.example"}}, "credentials"),
    ({"backends": ["mlflow"], "mlflow": {"tracking_uri": "mlflow.example"}}, "scheme"),
    ({"backends": ["wandb"], "wandb": {"api_key": "x"}}, "unknown field"),
    ({"backends": ["neptune"]}, "tracking.backends.0"),
])
def test_bad_tracking_settings_are_refused(tracking, message):
    with pytest.raises(InputError, match=message) as err:
        parse_spec(job("bad", tracking=tracking))
    assert "secret" not in str(err.value)


def test_a_missing_client_is_refused_before_the_run_folder_exists(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    spec = parse_spec(job("no-wandb", tracking={"backends": ["wandb"]}))
    with pytest.raises(InputError, match=r"pip install 'cropi\[tracking\]'"):
        run_job(spec, tmp_path / "run", Console(file=io.StringIO()))
    assert not (tmp_path / "run").exists()


def wandb_records(path: str) -> list:
    """The records of a .wandb file (a LevelDB-style log of W&B's protobuf Records; wandb >= 0.2x
    reads it in Go only, so the framing is read here and each record parsed by wandb's own schema)."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, out, buf = Path(path).read_bytes(), 32768, 7, [], b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            break
        buf, pos = buf + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a full record, or a fragmented one's last piece
            record = wandb_internal_pb2.Record()
            record.ParseFromString(buf)
            out.append(record)
            buf = b""
    return out


def test_wandb_offline_run_files(tmp_path, tiny_model, monkeypatch):
    pytest.importorskip("wandb", reason="W&B is the `tracking` extra: pip install 'cropi[tracking]'")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wandb").mkdir()
    spec = parse_spec(job("wb", tracking={"backends": ["wandb"], "wandb": {"mode": "offline", "project": "cropi-test",
                                                                           "tags": ["ci"]}}))
    run_job(spec, tmp_path / "run", Console(file=io.StringIO()))
    files = glob.glob(str(tmp_path / "wandb" / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(files) == 1
    records = wandb_records(files[0])
    runs = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert runs and runs[0].project == "cropi-test" and list(runs[0].tags) == ["ci"]
    history: dict[str, list[int]] = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            for key in items:
                history.setdefault(key, []).append(items["_step"])
    assert history["train/reward_mean"] == [1, 2, 3, 4]
    assert history["eval/add1/accuracy"] == [0, 2, 4]
    assert history["selection/selected"] == [0, 2]
    assert not (tmp_path / "run" / "tb").exists() or not any((tmp_path / "run" / "tb").iterdir())


def test_mlflow_file_store_read_back(tmp_path, tiny_model, monkeypatch):
    pytest.importorskip("mlflow", reason="MLflow is the `tracking` extra: pip install 'cropi[tracking]'")
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps its file store behind this switch
    uri = f"file:{tmp_path / 'mlruns'}"
    spec = parse_spec(job("mlf", tracking={"backends": ["tensorboard", "mlflow"],
                                           "mlflow": {"tracking_uri": uri, "experiment": "cropi-test"}}))
    run_job(spec, tmp_path / "run", Console(file=io.StringIO()))
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("cropi-test")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["curriculum.selector"] == "random"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/reward_mean")] == [1, 2, 3, 4]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "selection/eligible")] == [0, 2]
    assert scalar_steps(tmp_path / "run" / "tb", "train/reward_mean") == [1, 2, 3, 4]  # both backends


def test_a_services_job_reports_into_the_store_at_each_stage_end(redis_server, tmp_path, tiny_model, monkeypatch):
    monkeypatch.setenv("CROPI_TENSORBOARD_DIR", str(tmp_path / "tb"))
    r = redis_server.client()
    bus, jobs, store = TaskBus(r), JobRegistry(r), LocalStore(tmp_path / "store")
    controller = Controller(bus, jobs, store)
    executors = JobExecutors(store, track=True)  # as `cropi serve trainer` builds them
    worker = Worker([TaskKind.OFFLINE, TaskKind.PROJECT, TaskKind.TRAIN], bus, jobs, executors, "w1")
    name, reports = "svc-report", []
    try:
        controller.submit(parse_spec(job(name)))
        while jobs.get(name)["phase"] not in TERMINAL:
            controller.tick()
            for kind in (TaskKind.OFFLINE, TaskKind.PROJECT, TaskKind.TRAIN):
                while (task := bus.claim(kind, "w1", block_ms=None)) is not None:
                    worker.process(task)
                    if kind == TaskKind.TRAIN:  # a stage has ended: what the store reports now
                        reports.append({n: store.get(layout.report_key(name, n))
                                        for n in ("metrics.jsonl", "summary.json", "curves.png")})
    finally:
        executors.close()
    assert jobs.get(name)["status"] == "succeeded", jobs.get(name)
    assert len(reports) == 2
    for stage, report in enumerate(reports):
        summary = json.loads(report["summary.json"])
        assert [s["stage"] for s in summary["stages"]] == list(range(stage + 1))
        assert summary["complete"] == (stage == 1) and summary["targeted"] == ["add1"]
        records = [json.loads(line) for line in report["metrics.jsonl"].decode().splitlines()]
        assert [x["step"] for x in records if x["kind"] == "train"] == list(range(1, 2 * stage + 3))
        assert report["curves.png"][:8] == b"\x89PNG\r\n\x1a\n"
    # The trainer's TensorBoard (CROPI_TENSORBOARD_DIR/<job>): both stages' steps, once each.
    assert scalar_steps(tmp_path / "tb" / name, "train/reward_mean") == [1, 2, 3, 4]
