"""Issue H part 6, jobs recover instead of dying: one test per reproduced finding, each of which
failed before.

- A flipped byte in a stored part (offline trajectories, projected gradients) made the rerun of the
  job fail for good; the part is now found unreadable, recomputed (same bytes: every part is a
  deterministic function of the spec and the stage-start policy) and reported by its key.
- The services' controller, which has no model, failed the job naming the part; it now submits the
  part's task again and waits for it.
- A failed job could not be continued: `cropi run` again raised its old error. It now continues
  from the start of the stage it failed in, redoing nothing that was stored.
- The trainer unpickled `state.pt` from the store (`weights_only=False`): store write access meant
  code execution. A state holding anything but tensors and plain data is now refused unread.

The embedded runs here are `run_job` in this process (the stand-in verifier gives mixed rewards, so
that the validation sets have gradient parts too); "killed" is an exception no handler catches.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
import torch
from rich.console import Console

from cropi.curriculum import layout
from cropi.curriculum.controller import Controller
from cropi.curriculum.influence import InfluenceEngine
from cropi.curriculum.stage import TrainerJournal, UnsafeTrainerState, load_trainer_state
from cropi.data.rewards import register_verifier
from cropi.data.sources import load_job_data
from cropi.embedded import run_job
from cropi.executors import JobExecutors
from cropi.executors.inline import InlineExecutor, Policy
from cropi.influence.offline import CorruptPart, read_offline_part
from cropi.rollout.hf import HFRolloutEngine
from cropi.runtime.jobs import JobRegistry, Phase
from cropi.runtime.queue import TaskBus
from cropi.runtime.store import LocalStore
from cropi.runtime.tasks import TaskKind
from cropi.runtime.worker import Worker
from cropi.spec import parse_spec

from ..conftest import stand_in_verifier
from ..jobs import tiny_job

JOB = tiny_job(name="recovery")
NAME = JOB["name"]
POOL_PART = layout.offline_part_key(NAME, "pool", 0)
VALID_PART = layout.offline_part_key(NAME, "valid-add1", 0)
POOL_GRADS = layout.grads_key(NAME, 0, "pool", 0)
VALID_GRADS = layout.grads_key(NAME, 0, "valid-add1", 0)


class Killed(BaseException):
    """The process dying at this point: no handler of the run catches it."""


def die(*args, **kwargs):
    raise Killed()


def quiet() -> Console:
    return Console(quiet=True)


def recording() -> Console:
    return Console(record=True, width=400, force_terminal=False)


def store_of(run_dir: Path) -> LocalStore:
    return LocalStore(run_dir / "store")


def selections(run_dir: Path) -> list[dict]:
    store = store_of(run_dir)
    out = []
    for stage in range(JOB["curriculum"]["stages"]):
        sel = json.loads(store.get(layout.selection_key(NAME, stage)))
        out.append({k: v for k, v in sel.items() if k != "seconds"})  # a measurement, not a result
    return out


def train_steps(run_dir: Path) -> list[int]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in records if r["kind"] == "train"]


def flip_byte(path: Path, at: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if at is None else at
    data[i] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model) -> Path:
    """The undisturbed run the disturbed ones must reproduce."""
    run_dir = tmp_path_factory.mktemp("reference")
    with register_verifier("int", stand_in_verifier):
        run_job(parse_spec(JOB), run_dir, quiet())
    store = store_of(run_dir)
    for key in (POOL_PART, VALID_PART, POOL_GRADS, VALID_GRADS):
        assert store.exists(key), key  # the parts these tests damage
    return run_dir


def test_a_flipped_byte_in_an_offline_part_is_sampled_again_and_the_rerun_matches(reference, tmp_path,
                                                                                  mixed_rewards, monkeypatch):
    run_dir = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(InlineExecutor, "train", die)  # killed as stage 0's training starts
        with pytest.raises(Killed):
            run_job(parse_spec(JOB), run_dir, quiet())
    flip_byte(run_dir / "store" / POOL_PART)  # read back when stage 1 projects
    with pytest.raises(CorruptPart):
        read_offline_part(store_of(run_dir), POOL_PART)

    console = recording()
    result = run_job(parse_spec(JOB), run_dir, console)
    assert result.steps == 4
    assert selections(run_dir) == selections(reference)
    assert train_steps(run_dir) == [1, 2, 3, 4]
    assert read_offline_part(store_of(run_dir), POOL_PART) == read_offline_part(store_of(reference), POOL_PART)
    out = console.export_text()
    assert out.count(f"warning: stored part '{POOL_PART}' is unreadable: checksum mismatch; sampling it again") == 1
    events = (run_dir / "store" / layout.events_key(NAME)).read_text()
    assert POOL_PART in events and '"kind": "warning"' in events


def test_a_flipped_byte_in_a_gradient_part_is_projected_again_with_the_same_selection(reference, tmp_path,
                                                                                      mixed_rewards, monkeypatch):
    run_dir = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr("cropi.curriculum.controller.select_stage", die)  # killed once stage 0's parts are projected
        with pytest.raises(Killed):
            run_job(parse_spec(JOB), run_dir, quiet())
    store = run_dir / "store"
    assert not (store / layout.selection_key(NAME, 0)).exists()
    flip_byte(store / POOL_GRADS, at=200)  # in the array, past the .npy header
    flip_byte(store / VALID_GRADS.replace(".npy", ".json"))  # its sidecar

    console = recording()
    run_job(parse_spec(JOB), run_dir, console)
    assert selections(run_dir) == selections(reference)
    for key in (POOL_GRADS, VALID_GRADS):
        assert store_of(run_dir).get(key) == store_of(reference).get(key), f"{key}: not recomputed as it was"
    out = console.export_text()
    assert out.count(f"stored part '{POOL_GRADS}' is unreadable: checksum mismatch of part-00000.npy") == 1
    assert out.count(f"stored part '{VALID_GRADS}' is unreadable: checksum mismatch of part-00000.json") == 1


def test_a_failed_job_run_again_continues_from_the_stage_it_failed_in(reference, tmp_path, mixed_rewards,
                                                                      monkeypatch):
    from cropi.curriculum import controller

    real = controller.select_stage

    def fails_at_stage_1(spec, data, store, influence, stage, *args, **kwargs):
        if stage == 1:
            raise RuntimeError("injected failure")
        return real(spec, data, store, influence, stage, *args, **kwargs)

    run_dir = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(controller, "select_stage", fails_at_stage_1)
        with pytest.raises(RuntimeError, match="injected failure"):
            run_job(parse_spec(JOB), run_dir, quiet())
    events = (run_dir / "store" / layout.events_key(NAME)).read_text()
    assert '"kind": "failed"' in events
    assert train_steps(run_dir) == [1, 2]  # stage 0 trained before the job failed

    console = recording()
    result = run_job(parse_spec(JOB), run_dir, console)
    assert "continuing the failed job from the start of stage 1" in console.export_text()
    assert result.steps == 4
    assert train_steps(run_dir) == [1, 2, 3, 4], "every step exactly once: stage 0 was not trained again"
    assert selections(run_dir) == selections(reference)
    ref = json.loads((reference / "summary.json").read_text())
    got = json.loads((run_dir / "summary.json").read_text())
    assert got["after"] == ref["after"] and got["stages"] == ref["stages"]


# --------------------------------------------------------------------------- trainer state


class Payload:
    """What an attacker with write access to the store would put in `state.pt`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def crafted_state(marker: Path) -> bytes:
    buf = io.BytesIO()
    torch.save({"policy": Payload(marker), "progress": {}, "records": {}}, buf)
    return buf.getvalue()


def test_a_trainer_state_with_a_pickle_payload_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "ran"
    store = LocalStore(tmp_path / "store")
    key = layout.trainer_state_key("job")
    store.put(key, crafted_state(marker))
    journal = TrainerJournal(store, jobs=None, job="job", heartbeat=lambda: None)
    with pytest.raises(UnsafeTrainerState, match="refused, since loading it could run code") as err:
        journal.load()
    assert key in str(err.value)
    with pytest.raises(UnsafeTrainerState):
        load_trainer_state(store.get(key), key)  # what `cropi run` reads its summary with
    assert not marker.exists()
    # The payload is real: the old load would have run it.
    torch.load(io.BytesIO(store.get(key)), weights_only=False)
    assert marker.exists()


def test_a_rerun_refuses_a_planted_trainer_state(tmp_path, tiny_model, mixed_rewards, monkeypatch):
    run_dir = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(Policy, "train_step", die)  # killed during the first step: state.pt holds step 0
        with pytest.raises(Killed):
            run_job(parse_spec(JOB), run_dir, quiet())
    key = layout.trainer_state_key(NAME)
    store = store_of(run_dir)
    assert load_trainer_state(store.get(key), key)["progress"]["step"] == 0  # what cropi writes loads
    marker = tmp_path / "ran"
    store.put(key, crafted_state(marker))
    with pytest.raises(UnsafeTrainerState, match=key):
        run_job(parse_spec(JOB), run_dir, quiet())
    assert not marker.exists()


# --------------------------------------------------------------------------- the engine itself


def test_parts_that_do_not_read_back_whole_count_as_missing(tmp_path, tiny_model, mixed_rewards):
    """Damage a checksum cannot see (the bytes were stored as they are: a truncated or stray write)."""
    model, tok = tiny_model
    spec = parse_spec(JOB)
    store, data = LocalStore(tmp_path), load_job_data(spec)
    first = InfluenceEngine(spec, store, model, tok, part_size=16)
    first.collect_offline(HFRolloutEngine(model, tok), data)
    scores = first.score_stage(0)
    pool_part = layout.offline_part_key(NAME, "pool", 1)
    grads = [layout.grads_key(NAME, 0, "pool", i) for i in range(3)]
    good = {k: store.get(k) for k in [pool_part, *grads, grads[2].replace(".npy", ".json")]}

    store.put(pool_part, good[pool_part][: len(good[pool_part]) // 2])  # truncated Parquet
    store.put(grads[0], b"\x93NUMPY garbage")  # not an .npy array
    store.put(grads[1], good[grads[2]])  # another part's array: the shapes disagree with its sidecar
    meta = json.loads(good[grads[2].replace(".npy", ".json")])
    meta["prompt_ids"] = meta["prompt_ids"][::-1]  # not its prompts, in that order
    store.put(grads[2].replace(".npy", ".json"), json.dumps(meta, sort_keys=True).encode())

    # Without a model or a source to recompute them, the damage is an error naming the part.
    blind = InfluenceEngine(spec, store, part_size=16)
    with pytest.raises(CorruptPart, match=pool_part):
        blind.load_offline(data)

    warnings = []
    again = InfluenceEngine(spec, store, model, tok, part_size=16)
    again.warn = lambda message, **d: warnings.append(d["key"])
    again.collect_offline(HFRolloutEngine(model, tok), data)
    rescored = again.score_stage(0)
    assert warnings == [pool_part, *grads]
    assert {k: store.get(k) for k in good} == good
    assert rescored.prompt_ids == scores.prompt_ids
    assert (rescored.scores["add1"] == scores.scores["add1"]).all()


def test_the_services_controller_has_a_corrupt_part_recomputed_by_its_task(redis_server, tmp_path, tiny_model,
                                                                           mixed_rewards):
    """The controller has no model: it submits the part's task again, waits, and goes on."""
    r = redis_server.client()
    bus, jobs, store = TaskBus(r), JobRegistry(r), LocalStore(tmp_path / "store")
    controller = Controller(bus, jobs, store)
    executors = JobExecutors(store)
    worker = Worker([TaskKind.OFFLINE], bus, jobs, executors, "w1")
    try:
        controller.submit(parse_spec(JOB))
        controller.tick()  # queued -> offline: the parts' tasks are submitted
        while (task := bus.claim(TaskKind.OFFLINE, "w1", block_ms=None)) is not None:
            worker.process(task)
        good = store.get(POOL_PART)
        flip_byte(tmp_path / "store" / POOL_PART)

        controller.tick()  # every offline task is done, but a part does not read back
        rec = jobs.get(NAME)
        assert rec["phase"] == Phase.OFFLINE and not rec["error"]
        warning = [e for e in jobs.events(NAME) if e["kind"] == "warning"]
        assert len(warning) == 1 and "offline:pool:0" in warning[0]["message"]
        controller.tick()  # asking again does not enqueue it twice
        assert bus.depth(TaskKind.OFFLINE)["waiting"] == 1

        worker.process(bus.claim(TaskKind.OFFLINE, "w1", block_ms=None))
        controller.tick()
        assert jobs.get(NAME)["phase"] == Phase.PROJECT  # read whole now: the job went on
        assert store.get(POOL_PART) == good  # the same bytes as before the damage
    finally:
        executors.close()
