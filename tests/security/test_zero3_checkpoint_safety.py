"""Issue H: a ZeRO checkpoint read back from the store never runs code.

The Ray trainer stores DeepSpeed's own checkpoint files (each rank's model states, which carry the
client state with the LR schedule, and optimizer states) under `jobs/<job>/trainer/zero/slot-<i>/`.
DeepSpeed read them with `torch.load(weights_only=False)`: store write access meant code execution
in every trainer rank. They are now loaded with `weights_only=True` and DeepSpeed's few state types
allowed (`cropi.rl.zero_checkpoint`); a file holding anything else is refused, naming its key.

Real DeepSpeed (gloo, CPU), one rank, in a spawned process (its process group stays out of this
one): `ZeroGRPOTrainer.save_state` writes a genuine slot, the test plants files in copies of it,
and a fresh trainer's `load_state` reads them.
"""

from __future__ import annotations

import io
import json
import multiprocessing as mp
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from cropi.curriculum import layout
from cropi.runtime.store import LocalStore

pytest.importorskip("deepspeed", reason="the Ray trainer needs the `ray` extra (deepspeed)")

from cropi.rl.zero_checkpoint import SAFE_GLOBALS, load_safely  # noqa: E402

JOB = "zero-safety"
SLOT = layout.zero_slot(JOB, 1)
MODEL_STATES = f"{SLOT}/state/zero_pp_rank_0_mp_rank_00_model_states.pt"
OPTIM_STATES = f"{SLOT}/state/zero_pp_rank_0_mp_rank_00_optim_states.pt"
TIMEOUT_S = 300


def _trainer_process(conn, store_root: str, port: int) -> None:
    """Serves ("save" | "fresh" | "load", prefix, zero_stage) with a new one-rank trainer each time;
    answers ("ok", snapshot) or ("error", exception type, message)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    torch.set_num_threads(1)
    import torch.distributed as dist
    from transformers import GPT2Config, GPT2LMHeadModel

    from cropi.rl.zero3 import ZeroGRPOTrainer
    from cropi.spec import RLSpec

    dist.init_process_group("gloo", rank=0, world_size=1)
    store = LocalStore(store_root)
    config = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=16, bos_token_id=0,
                        eos_token_id=0)

    def trainer(zero_stage: int) -> ZeroGRPOTrainer:
        torch.manual_seed(0)
        return ZeroGRPOTrainer(GPT2LMHeadModel(config), None, 0, RLSpec(lr=1e-2, warmup_steps=4, micro_batch=2),
                               zero_stage=zero_stage, param_persistence_threshold=0)

    def snapshot(t: ZeroGRPOTrainer) -> dict:
        """What a resume must bring back: the fp32 master weights, Adam's moments, the schedule."""
        return flat({"optimizer": t.engine.optimizer.state_dict(), "schedule": t.scheduler.state_dict()})

    while (request := conn.recv()) is not None:
        op, prefix, zero_stage = request
        try:
            t = trainer(zero_stage)
            if op == "save":  # one step that moves weights, moments and the schedule
                t.engine.backward(t.engine(torch.tensor([[1, 2, 3, 4]])).logits.square().mean())
                t.engine.step()
                t.scheduler.step()
                t.save_state(store, prefix)
            elif op == "load":
                t.load_state(store, prefix)
            conn.send(("ok", snapshot(t)))
        except Exception as err:  # noqa: BLE001 - reported to the test as it is
            conn.send(("error", type(err).__name__, str(err)))
    dist.destroy_process_group()


def flat(obj, path: str = "") -> dict:
    """Every leaf of nested dicts and lists by its path: tensors as they are, anything else as its repr."""
    if isinstance(obj, dict):
        return {k: v for key, value in obj.items() for k, v in flat(value, f"{path}/{key}").items()}
    if isinstance(obj, (list, tuple)):
        return {k: v for i, value in enumerate(obj) for k, v in flat(value, f"{path}/{i}").items()}
    return {path: obj.detach().clone() if isinstance(obj, torch.Tensor) else repr(obj)}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)


class TrainerProcess:
    def __init__(self, store: LocalStore):
        from cropi.runtime.redis_server import free_port

        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_trainer_process, args=(child, str(store.root), free_port()), daemon=True)
        self.proc.start()

    def __call__(self, op: str, prefix: str, zero_stage: int = 3):
        self.conn.send((op, prefix, zero_stage))
        if not self.conn.poll(TIMEOUT_S):
            pytest.fail(f"the trainer process did not answer {op} {prefix} (exit code {self.proc.exitcode})")
        return self.conn.recv()

    def close(self) -> None:
        self.conn.send(None)
        self.proc.join(timeout=30)
        if self.proc.is_alive():
            self.proc.kill()


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> LocalStore:
    return LocalStore(tmp_path_factory.mktemp("zero-safety-store"))


@pytest.fixture(scope="module")
def trainer(store):
    process = TrainerProcess(store)
    yield process
    process.close()


@pytest.fixture(scope="module")
def saved(trainer, store) -> dict:
    """The genuine slot (ZeRO-3) and what the trainer that wrote it held."""
    answer = trainer("save", SLOT)
    assert answer[0] == "ok", answer
    return answer[1]


def copy_slot(store: LocalStore, name: str) -> str:
    """A copy of the genuine slot under another job's slot prefix, to plant files in."""
    prefix = layout.zero_slot(name, 0)
    for key in store.list(f"{SLOT}/"):
        store.put(prefix + key[len(SLOT):], store.get(key))
    return prefix


def genuine(store: LocalStore, key: str) -> dict:
    with torch.serialization.safe_globals(SAFE_GLOBALS):
        return torch.load(io.BytesIO(store.get(key)), weights_only=True)


def saved_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


class Payload:
    """What an attacker with write access to the store would put in a ZeRO file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_the_slot_holds_deepspeeds_files_for_the_rank(saved, store):
    names = sorted(key.rsplit("/", 1)[1] for key in store.list(f"{SLOT}/state/"))
    assert names == [MODEL_STATES.rsplit("/", 1)[1], OPTIM_STATES.rsplit("/", 1)[1]]
    assert genuine(store, MODEL_STATES)["scheduler"]["last_epoch"] == 1  # the client state is in there


@pytest.mark.parametrize("zero_stage", [3, 2])
def test_a_genuine_checkpoint_loads_and_restores_weights_moments_and_schedule(trainer, saved, zero_stage):
    prefix, want = SLOT, saved
    if zero_stage == 2:  # ZeRO-2's files hold one more DeepSpeed type (the parameters' slices)
        prefix = layout.zero_slot(f"{JOB}-zero2", 1)
        status, want = trainer("save", prefix, zero_stage=2)
        assert status == "ok", want
    status, fresh = trainer("fresh", prefix, zero_stage)
    assert status == "ok"
    assert not same(fresh, want)  # a trainer that loads nothing starts elsewhere: the check below can fail

    status, loaded = trainer("load", prefix, zero_stage)
    assert status == "ok", loaded
    assert same(loaded, want)  # exactly: master weights, moments, step counts, the schedule


@pytest.mark.parametrize("key", [MODEL_STATES, OPTIM_STATES], ids=["model-and-client-states", "optimizer-states"])
def test_a_pickle_payload_in_a_zero_slot_is_refused_without_running_it(trainer, saved, store, tmp_path, key):
    marker = tmp_path / "ran"
    prefix = copy_slot(store, "planted-model" if key == MODEL_STATES else "planted-optim")
    planted = prefix + key[len(SLOT):]
    state = genuine(store, key)
    state["payload"] = Payload(marker)
    store.put(planted, saved_bytes(state))

    answer = trainer("load", prefix)
    assert not marker.exists(), "the payload ran in the trainer"
    assert answer[:2] == ("error", "UnsafeZeroCheckpoint"), answer
    message = answer[2]
    assert f"ZeRO checkpoint file {planted!r}" in message and "refused, since loading it could run code" in message
    assert "touch" not in message  # names the file, not what is in it
    # The payload is real: DeepSpeed's stock load would have run it.
    torch.load(io.BytesIO(store.get(planted)), weights_only=False)
    assert marker.exists()


def test_a_schedule_state_with_keys_the_scheduler_never_wrote_is_refused(trainer, saved, store):
    prefix = copy_slot(store, "planted-schedule")
    state = genuine(store, MODEL_STATES)
    state["scheduler"]["optimizer"] = {"param_groups": []}  # would replace the scheduler's optimizer
    store.put(prefix + MODEL_STATES[len(SLOT):], saved_bytes(state))

    answer = trainer("load", prefix)
    assert answer[:2] == ("error", "UnsafeZeroCheckpoint"), answer
    assert f"ZeRO checkpoint {prefix!r} holds a schedule state cropi did not write" in answer[2]


def test_files_beside_the_tag_are_not_downloaded(trainer, saved, store):
    """DeepSpeed reads only the tag's files; a manifest naming others gets nothing else onto the rank."""
    prefix = copy_slot(store, "planted-manifest")
    manifest = json.loads(store.get(f"{prefix}/manifest.json"))
    manifest["files"].append("extra/not-there.pt")  # would fail the load if it were fetched
    store.put(f"{prefix}/manifest.json", json.dumps(manifest).encode())

    status, loaded = trainer("load", prefix)
    assert status == "ok", loaded
    assert same(loaded, saved)


def test_only_deepspeeds_torch_checkpoint_engine_is_made_safe_others_are_refused():
    """Another checkpoint engine (fast, decoupled, DataStates) has its own `torch.load`."""
    from deepspeed.runtime.checkpoint_engine.fast_checkpoint_engine import FastCheckpointEngine

    engine = SimpleNamespace(checkpoint_engine=FastCheckpointEngine.__new__(FastCheckpointEngine))
    with pytest.raises(TypeError, match="FastCheckpointEngine is not the torch one"):
        load_safely(engine)
