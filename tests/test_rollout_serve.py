"""The rollout service on Ray Serve: a request gets what the HF engine samples
for it alone, concurrent requests are batched without changing their
answers, and new weights (direct, from the store, through the weight board)
change what the replica samples and scores, at a version callers can wait for."""

from __future__ import annotations

import copy
import threading
import time

import pytest
import torch

from cropi.errors import InputError
from cropi.rl.batch import collate, response_logits, token_logprobs
from cropi.rollout.base import SamplingParams, Trajectory
from cropi.rollout.hf import HFRolloutEngine
from cropi.spec import parse_spec

from .conftest import TEST_MODEL
from .weights import perturbed

pytest.importorskip("ray", reason="the rollout service needs the `ray` extra")

from ray import serve

from cropi.executors.ray.replica import (
    HFReplicaEngine,
    RolloutConfig,
    RolloutReplica,
)
from cropi.executors.ray.rollout_serve import (
    ServeRolloutEngine,
    start_rollout_service,
    stop_rollout_service,
)

PROMPTS = ["1+2=", "max(12,3456)=", "rev(98)="]
BATCH = 4  # sequences per HF generation chunk: requests of 3 prompts x 3 samples span several chunks
SAMPLED = SamplingParams(temperature=0.8, max_new_tokens=6, seed=11)


def _spec(name: str, **model):
    return parse_spec({"name": name, "executor": "ray", "model": {"path": TEST_MODEL, **model},
                       "rollout": {"batch_size": BATCH}})


def _start(name: str, follow_board: bool = False):
    return start_rollout_service(_spec(name), name, max_batch_size=8, batch_wait_timeout_s=0.3, version_wait_s=3,
                                 follow_board=follow_board)


@pytest.fixture(scope="module")
def serve_module(ray_local):
    """Serve for this module's apps; shut down after them, so no Serve controller outlives the module."""
    yield
    serve.shutdown()


@pytest.fixture(scope="module")
def service(serve_module, tiny_model):
    """A one-replica service whose weights stay those of the test model."""
    handle = _start("rollout-test")
    yield handle
    stop_rollout_service("rollout-test")


@pytest.fixture(scope="module")
def weights_service(serve_module, tiny_model):
    """A one-replica service whose weights the tests change (following its weight board)."""
    handle = _start("rollout-weights-test", follow_board=True)
    yield handle
    stop_rollout_service("rollout-weights-test")


def _teacher_forced(model, prompt_ids, response_ids, temperature):
    """The trainer's recomputation of a response's log-probs (what the replica must agree with)."""
    fixed = Trajectory(prompt_ids, response_ids, [0.0] * len(response_ids), "", False)
    batch = collate([fixed], 0)
    with torch.no_grad():
        return token_logprobs(response_logits(model, batch, temperature), batch.response_ids)[0].tolist()


def _assert_same(got: list[list[Trajectory]], want: list[list[Trajectory]]) -> None:
    assert [[t.response_ids for t in g] for g in got] == [[t.response_ids for t in g] for g in want]
    for g, w in zip(got, want):
        for a, b in zip(g, w):
            assert (a.prompt_ids, a.text, a.finished, a.temperature) == (b.prompt_ids, b.text, b.finished,
                                                                         b.temperature)
            assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)


def _version(handle) -> int:
    return handle.version.remote().result()


# --------------------------------------------------------------------- sampling


def test_a_request_gets_what_the_hf_engine_samples_for_it_alone(service, tiny_model):
    model, tok = tiny_model
    reference = HFRolloutEngine(model, tok, batch_size=BATCH)
    engine = ServeRolloutEngine(service)

    _assert_same(engine.generate(PROMPTS, 3, SAMPLED), reference.generate(PROMPTS, 3, SAMPLED))
    greedy = SamplingParams(greedy=True, max_new_tokens=6)
    _assert_same(engine.generate(PROMPTS, 1, greedy), reference.generate(PROMPTS, 1, greedy))


def test_concurrent_requests_are_batched_and_each_keeps_its_solo_answer(service, tiny_model):
    model, tok = tiny_model
    reference = HFRolloutEngine(model, tok, batch_size=BATCH)
    requests = [(PROMPTS[: 1 + i % 3], 2 + i % 2, SamplingParams(temperature=1.0, max_new_tokens=5, seed=i,
                                                                   greedy=i == 3)) for i in range(5)]
    seen = len(service.stats.remote().result()["batch_sizes"])

    responses = [service.generate.remote(*r) for r in requests]
    results = [r.result() for r in responses]

    sizes = service.stats.remote().result()["batch_sizes"][seen:]
    assert sum(sizes) == len(requests) and max(sizes) > 1
    for request, got in zip(requests, results):
        _assert_same(got, reference.generate(*request))


def test_a_malformed_request_is_refused_with_the_reason(service):
    with pytest.raises(InputError, match="prompts must be a list of strings"):
        service.generate.remote("1+2=", 2, SAMPLED).result()
    with pytest.raises(InputError, match="n must be a positive integer"):
        service.generate.remote(PROMPTS, 0, SAMPLED).result()


# --------------------------------------------------------------------- weights


def test_weights_from_the_store_change_what_the_replica_scores_and_samples(weights_service, tiny_model, tmp_path):
    from cropi.executors.ray.weight_sync import publish_weights
    from cropi.runtime.store import LocalStore

    model, tok = tiny_model
    new = perturbed(model, seed=1)
    store = LocalStore(tmp_path / "store")
    publish_weights(new, store, "jobs/t/trainer/weights", tok)
    prompt_ids, response_ids = tok("max(3,9)=")["input_ids"], tok("9")["input_ids"] + [tok.eos_token_id]
    version = _version(weights_service) + 1

    weights_service.load_weights_from_store.remote(store.url, "jobs/t/trainer/weights", version).result()

    assert _version(weights_service) == version
    scored = weights_service.logprobs.remote(prompt_ids, response_ids, 0.7).result()
    assert scored == pytest.approx(_teacher_forced(new, prompt_ids, response_ids, 0.7), abs=1e-5)
    assert scored != pytest.approx(_teacher_forced(model, prompt_ids, response_ids, 0.7), abs=1e-3)
    _assert_same(ServeRolloutEngine(weights_service).generate(PROMPTS, 2, SAMPLED),
                 HFRolloutEngine(new, tok, batch_size=BATCH).generate(PROMPTS, 2, SAMPLED))


def test_a_request_for_newer_weights_waits_for_them(weights_service, tiny_model):
    model, tok = tiny_model
    new = perturbed(model, seed=2)
    version = _version(weights_service) + 1
    pending = weights_service.generate.remote(PROMPTS, 2, SAMPLED, version)
    time.sleep(0.5)  # the request is queued behind its version, not answered from the current weights

    weights_service.load_weights.remote(new.state_dict(), version).result()

    _assert_same(pending.result(), HFRolloutEngine(new, tok, batch_size=BATCH).generate(PROMPTS, 2, SAMPLED))
    engine = ServeRolloutEngine(weights_service, min_version_fn=lambda: version + 1)
    with pytest.raises(TimeoutError, match=rf"needs >= {version + 1} and none arrived within 3s"):
        engine.generate(PROMPTS, 1, SAMPLED)


def test_replicas_follow_the_trainers_broadcasts_announced_on_the_weight_board(weights_service, tiny_model):
    import ray

    from cropi.executors.ray.weight_channel import get_or_create_board, node_address
    from cropi.executors.ray.weight_sync import SyncGroup, send_weights
    from cropi.runtime.redis_server import free_port

    model, tok = tiny_model
    trainer = perturbed(model, seed=3)
    host, port = node_address(), free_port()
    version = _version(weights_service) + 1
    ray.get(get_or_create_board("rollout-weights-test").announce.remote(
        {"path": "broadcast", "host": host, "port": port, "backend": "gloo"}))
    group = SyncGroup.create_sender(host, port, receivers=1, backend="gloo", timeout_s=60)
    try:
        send_weights(trainer, group, version, bucket_bytes=64 << 10)  # many buckets: a streamed version
        engine = ServeRolloutEngine(weights_service, min_version_fn=lambda: version)
        got = engine.generate(PROMPTS, 2, SAMPLED)
    finally:
        group.close()

    assert _version(weights_service) == version
    _assert_same(got, HFRolloutEngine(trainer, tok, batch_size=BATCH).generate(PROMPTS, 2, SAMPLED))


def test_a_half_streamed_version_holds_sampling_until_it_is_complete(tiny_model):
    model, tok = tiny_model
    engine = HFReplicaEngine(copy.deepcopy(model), tok, batch_size=BATCH)
    replica = RolloutReplica(engine, engine.weight_names)
    new = dict(perturbed(model, seed=4).state_dict())
    names = sorted(engine.weight_names)
    first, rest = names[: len(names) // 2], names[len(names) // 2 :]

    replica.apply_bucket([(n, new[n]) for n in first], version=7)
    assert replica.version == 0
    with pytest.raises(TimeoutError, match=r"version 7 is half-applied"):
        replica.generate_many([(PROMPTS, 1, SAMPLED)], wait_s=0.1)

    waiting = threading.Thread(target=replica.generate_many, args=([(PROMPTS, 1, SAMPLED)], 10.0))
    waiting.start()
    replica.apply_bucket([(n, new[n]) for n in rest], version=7)
    waiting.join(timeout=30)
    assert replica.version == 7 and not waiting.is_alive()  # the held request ran on the complete version


# --------------------------------------------------------------------- bad input


def test_an_unknown_engine_is_refused_before_anything_starts():
    with pytest.raises(InputError, match=r"rollout\.engine: unknown engine 'tgi'; known: hf, vllm"):
        RolloutConfig(model_path=TEST_MODEL, engine="tgi")
    from services.rollout.app import build_app

    with pytest.raises(InputError, match="unknown engine 'tgi'"):
        build_app({"model_path": TEST_MODEL, "engine": "tgi"})
    with pytest.raises(InputError, match="model_path: Field required"):
        build_app({"engine": "hf"})
    with pytest.raises(InputError, match="batch_size: Input should be a valid integer"):
        build_app({"model_path": TEST_MODEL, "batch_size": "many"})
    with pytest.raises(InputError, match="replica: Extra inputs are not permitted"):
        build_app({"model_path": TEST_MODEL, "replica": "2"})


def test_a_missing_model_path_is_reported_with_the_replicas_own_error(serve_module, tmp_path):
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(InputError, match=rf"model\.path: {missing} does not exist"):
        start_rollout_service(_spec("rollout-missing", path=missing), "rollout-missing")
    assert serve.status().applications.get("rollout-missing") is None  # the failed app is not left behind
