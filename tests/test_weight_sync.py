"""Trainer -> rollout weight sync with real processes: two DeepSpeed ZeRO-3
trainer ranks on gloo, rollout replicas holding the HF engine, a real
broadcast group on loopback and a real store folder."""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
from pathlib import Path

import pytest
import torch

from cropi.rollout.base import Trajectory
from tests.conftest import TEST_MODEL

pytest.importorskip("deepspeed", reason="the ZeRO-3 trainer needs the `ray` extra (deepspeed)")

PROMPT, RESPONSE = "12+34=", "46"
BUCKET_BYTES = 512 << 10  # the tiny model is ~4 MB in fp32: several buckets
ZERO3 = {
    "train_micro_batch_size_per_gpu": 1,
    "optimizer": {"type": "AdamW", "params": {"torch_adam": True, "lr": 1e-2}},
    # Partition every parameter: by default ZeRO-3 keeps tensors under 1e5 elements (all of
    # the tiny model's) whole on every rank, and nothing would need gathering.
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
}
# A hang guard, not a speed target: on a fresh machine DeepSpeed first compiles its CPU
# communication op (1-2 minutes on 2 busy cores) while the receiver already waits.
TIMEOUT_S = 300


def fixed_batch(tokenizer):
    """RESPONSE (then EOS) after PROMPT, collated as the trainer does."""
    from cropi.rl.batch import collate

    response = tokenizer(RESPONSE, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    traj = Trajectory(prompt_ids=tokenizer(PROMPT)["input_ids"], response_ids=response,
                      logprobs=[0.0] * len(response), text=RESPONSE, finished=True)
    return collate([traj], tokenizer.pad_token_id)


def teacher_forced(model, tokenizer) -> torch.Tensor:
    """The model's log-probs of the fixed response's tokens."""
    from cropi.rl.batch import response_logits, token_logprobs

    batch = fixed_batch(tokenizer)
    with torch.no_grad():
        return token_logprobs(response_logits(model, batch), batch.response_ids)[0]


def _trainer_rank(rank: int, dist_port: int, sync_port: int, store_root: str, results) -> None:
    """One ZeRO-3 rank: a step that changes the weights, then both sync paths."""
    import deepspeed
    import torch.distributed as dist

    from cropi.executors.ray.weight_sync import SyncGroup, publish_weights, send_weights
    from cropi.models.loading import load_policy
    from cropi.rl.batch import response_logits, token_logprobs
    from cropi.runtime.store import LocalStore

    torch.set_num_threads(1)
    os.environ["LOCAL_RANK"] = str(rank)  # DeepSpeed insists on it (launchers set it)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{dist_port}", rank=rank, world_size=2)
    model, tok = load_policy(TEST_MODEL)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ZERO3)
    batch = fixed_batch(tok)
    loss = -token_logprobs(response_logits(engine, batch), batch.response_ids).mean()
    engine.backward(loss)
    engine.step()
    engine.eval()

    sharded = all(p.numel() == 0 for p in engine.module.parameters())  # ZeRO-3 left placeholders only
    group = SyncGroup.create_sender("127.0.0.1", sync_port, receivers=1, timeout_s=TIMEOUT_S) if rank == 0 else None
    stats = send_weights(engine, group, version=7, bucket_bytes=BUCKET_BYTES)
    publish_weights(engine, LocalStore(store_root), "weights", tok, bucket_bytes=BUCKET_BYTES)
    logprobs = teacher_forced(engine.module, tok)  # a ZeRO-3 forward: every rank takes part
    if rank == 0:
        group.close()
        results.put(("trainer", {"stats": stats, "logprobs": logprobs.tolist(), "sharded": sharded}))
    dist.destroy_process_group()


def _receiver(sync_port: int, results) -> None:
    """A rollout replica on the original weights: receives versions until the sender closes."""
    from cropi.executors.ray.weight_sync import SyncClosed, SyncGroup, receive_weights

    from tests.weights import hf_apply
    from cropi.models.loading import load_policy
    from cropi.rollout.hf import HFRolloutEngine

    torch.set_num_threads(1)
    model, tok = load_policy(TEST_MODEL)
    engine = HFRolloutEngine(model, tok)
    seen = {"before": teacher_forced(engine.model, tok).tolist(), "versions": [], "buckets": 0}
    apply = hf_apply(engine.model)

    def counting_apply(named, version):
        seen["buckets"] += 1
        apply(named, version)

    group = SyncGroup.join_receiver("127.0.0.1", sync_port, timeout_s=TIMEOUT_S)
    seen["rank"] = group.rank
    try:
        while True:
            version = receive_weights(group, counting_apply)
            seen["versions"].append((version, teacher_forced(engine.model, tok).tolist()))
    except SyncClosed:
        seen["closed"] = True
    group.close()
    results.put(("receiver", seen))


def _collect(procs: list[mp.Process], results, expected: int) -> list[tuple[str, dict]]:
    """The reports of `expected` started processes; all of them must exit cleanly."""
    out = []
    try:
        for _ in range(expected):
            out.append(results.get(timeout=TIMEOUT_S))
    except queue.Empty:
        pytest.fail(f"only {len(out)} of {expected} processes reported; exit codes {[p.exitcode for p in procs]}")
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    assert [p.exitcode for p in procs] == [0] * len(procs)
    return out


@pytest.fixture(scope="module")
def zero3_sync(tiny_model, tmp_path_factory):
    """Two ZeRO-3 trainer ranks take a step, broadcast to one replica and publish to a store."""
    from cropi.runtime.redis_server import free_port

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    store_root = tmp_path_factory.mktemp("sync-store")
    dist_port, sync_port = free_port(), free_port()
    procs = [ctx.Process(target=_trainer_rank, args=(r, dist_port, sync_port, str(store_root), results))
             for r in range(2)]
    procs.append(ctx.Process(target=_receiver, args=(sync_port, results)))
    for p in procs:
        p.start()
    reports = dict(_collect(procs, results, expected=2))
    return reports["trainer"], reports["receiver"], store_root


def test_after_a_broadcast_the_replica_scores_a_response_as_the_zero3_trainer_does(zero3_sync):
    trainer, receiver, _ = zero3_sync
    assert trainer["sharded"]  # the weights had to be gathered
    assert trainer["stats"]["buckets"] >= 4 and receiver["buckets"] == trainer["stats"]["buckets"]
    [(version, after)] = receiver["versions"]
    assert version == 7 and receiver["closed"]
    expected = torch.tensor(trainer["logprobs"])
    torch.testing.assert_close(torch.tensor(after), expected, atol=1e-6, rtol=0)
    # The step moved the weights: the replica's scores before the sync were different.
    assert (torch.tensor(receiver["before"]) - expected).abs().max() > 1e-3


def test_published_weights_load_into_a_replica_and_form_a_complete_hf_folder(zero3_sync):
    from cropi.models.loading import load_policy
    from cropi.runtime.store import LocalStore

    from tests.weights import load_published_weights

    trainer, _, store_root = zero3_sync
    expected = torch.tensor(trainer["logprobs"])
    model, tok = load_policy(TEST_MODEL)
    load_published_weights(LocalStore(store_root), "weights", model)
    torch.testing.assert_close(teacher_forced(model, tok), expected, atol=1e-6, rtol=0)
    # The folder is usable as a model path (config, weights and tokenizer).
    folder_model, folder_tok = load_policy(str(Path(store_root) / "weights"))
    torch.testing.assert_close(teacher_forced(folder_model, folder_tok), expected, atol=1e-6, rtol=0)


def test_every_receiver_gets_every_version_and_a_full_group_refuses_more(tiny_model):
    """A plain (non-ZeRO) sender in this process, two replica processes."""
    from cropi.executors.ray.weight_sync import SyncGroup, send_weights
    from cropi.models.loading import load_policy
    from cropi.runtime.redis_server import free_port

    model, tok = load_policy(TEST_MODEL)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_receiver, args=(port, results)) for _ in range(2)]
    for p in procs:
        p.start()
    expected = []
    try:
        group = SyncGroup.create_sender("127.0.0.1", port, receivers=2, timeout_s=TIMEOUT_S)
        try:
            with pytest.raises(RuntimeError, match="is full"):
                SyncGroup.join_receiver("127.0.0.1", port, timeout_s=10)
            for version in (1, 2):
                with torch.no_grad():
                    for weight in model.parameters():
                        weight.mul_(1.0 + 0.05 * version)
                send_weights(model, group, version, bucket_bytes=BUCKET_BYTES)
                expected.append(teacher_forced(model, tok))
        finally:
            group.close()
    finally:
        reports = [seen for _, seen in _collect(procs, results, expected=2)]
    assert sorted(seen["rank"] for seen in reports) == [1, 2]
    for seen in reports:
        assert [v for v, _ in seen["versions"]] == [1, 2] and seen["closed"]
        for (_, got), want in zip(seen["versions"], expected):
            torch.testing.assert_close(torch.tensor(got), want, atol=1e-6, rtol=0)


def test_a_received_weight_the_local_model_lacks_is_an_error(tiny_model):
    from tests.weights import hf_apply

    model, _ = tiny_model
    with pytest.raises(KeyError, match="not.a.weight"):
        hf_apply(model)([("not.a.weight", torch.zeros(1))], 1)


def test_buckets_stay_within_their_size_unless_one_tensor_alone_is_larger():
    from cropi.executors.ray.weight_sync import gathered_buckets

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(64, 64), torch.nn.BatchNorm1d(4))
    buckets = [[(name, t.numel() * t.element_size()) for name, t in bucket]
               for bucket, _ in gathered_buckets(model, bucket_bytes=100)]
    for bucket in buckets:
        assert len(bucket) == 1 or sum(size for _, size in bucket) <= 100
    names = [name for bucket in buckets for name, _ in bucket]
    # Parameters and persistent buffers (running stats), in module order.
    assert names == ["0.weight", "0.bias", "1.weight", "1.bias", "2.weight", "2.bias",
                     "2.running_mean", "2.running_var", "2.num_batches_tracked"]
    assert [("1.weight", 64 * 64 * 4)] in buckets
