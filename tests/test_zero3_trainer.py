"""The ZeRO-3 GRPO trainer on Ray Train takes the single-process trainer's steps.

Two Ray Train workers (gloo, DeepSpeed ZeRO-3 with every parameter
partitioned) and `GRPOTrainer` start from the same weights and train on the
same fixed batch; they must agree on the loss, the stats and every updated
weight: after one step, after a second one taken by a fresh trainer that
restored the first one's state from the object store, after an optimizer
reset, with SGD, and under ZeRO-2. The consolidated HF export is what they
trained.
"""

from __future__ import annotations

import copy
import io
import tempfile
from pathlib import Path

import pytest
import torch

from cropi.data.arith import generate
from cropi.models.loading import resolve_model_path
from cropi.rl.trainer import GRPOTrainer
from cropi.rollout.base import SamplingParams
from cropi.rollout.hf import HFRolloutEngine
from cropi.runtime.store import LocalStore
from cropi.spec import RLSpec

from .conftest import TEST_MODEL

pytest.importorskip("deepspeed", reason="the Ray trainer needs the `ray` extra (deepspeed)")

# micro_batch 2 over 9 sequences: rank 0 runs 5 sequences in 3 passes, rank 1 runs 4 in 2 plus an empty
# pass (ZeRO-3 needs the same number of forwards on every rank). A short warmup makes the restored
# schedule matter: step 2 must use twice step 1's learning rate.
RL = RLSpec(lr=1e-2, warmup_steps=4, micro_batch=2, kl_coef=0.05, entropy_coef=0.01)
# Unclipped SGD is not scale-invariant as Adam (and clipping) are: its weights check the gradient
# scaling across ranks directly.
RL_SGD = RL.model_copy(update={"optimizer": "sgd", "lr": 0.5, "max_grad_norm": 1e6})
REWARDS = [[1.0, 0.0, 0.0], [0.0, 1.0, 1.0], [1.0, 0.0, 1.0]]
TEMPERATURE = 1.0


@pytest.fixture(scope="module")
def groups(tiny_model):
    model, tokenizer = tiny_model
    prompts = [p.text for p in generate(len(REWARDS), seed="zero3-test")]
    engine = HFRolloutEngine(model, tokenizer)
    return engine.generate(prompts, len(REWARDS[0]), SamplingParams(temperature=TEMPERATURE, max_new_tokens=8, seed=3))


@pytest.fixture(scope="module")
def reference(tiny_model, groups):
    """The single-process trainer: (stats, weights) after step 1, step 2, and a step after a reset; and SGD."""
    model, tokenizer = tiny_model

    def trainer(rl: RLSpec) -> GRPOTrainer:
        return GRPOTrainer(copy.deepcopy(model), copy.deepcopy(model), tokenizer.pad_token_id, rl, TEMPERATURE)

    def step(t: GRPOTrainer) -> tuple[dict, dict]:
        stats = t.step(groups, REWARDS)
        return stats, {k: v.clone() for k, v in t.model.state_dict().items()}

    adam = trainer(RL)
    steps = [step(adam), step(adam)]
    adam.reset_optimizer()
    steps.append(step(adam))
    return {"adamw": steps, "sgd": step(trainer(RL_SGD))}


def _to_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def zero3_scenario(cfg: dict) -> dict:
    """Per rank: AdamW step, save to the store; a fresh trainer loads it, steps, exports, resets, steps.

    Then one SGD step, and one step under ZeRO-2 (the other stage `ray.zero_stage` offers).
    """
    import time

    from cropi.executors.ray.stage import export_hf
    from cropi.models.loading import load_policy
    from cropi.rl.zero3 import ZeroGRPOTrainer
    from cropi.runtime.config import open_store
    from tests.weights import full_state_dict

    store = open_store(cfg["store_url"])

    def new_trainer(rl: RLSpec, zero_stage: int = 3) -> tuple[ZeroGRPOTrainer, object]:
        model, tokenizer = load_policy(cfg["model"])
        ref, _ = load_policy(cfg["model"])
        # Threshold 0: every parameter is partitioned, none kept whole on each rank.
        return ZeroGRPOTrainer(model, ref, tokenizer.pad_token_id, rl, TEMPERATURE, zero_stage=zero_stage,
                               param_persistence_threshold=0), tokenizer

    def step(trainer: ZeroGRPOTrainer) -> tuple[dict, dict | None]:
        stats = trainer.step(cfg["groups"], REWARDS)
        return stats, full_state_dict(trainer)

    trainer, tokenizer = new_trainer(RL)
    t0 = time.perf_counter()
    steps = [step(trainer)]
    step_s = time.perf_counter() - t0
    trainer.save_state(store, "trainer/zero")
    del trainer

    # Everything step 1 changed (weights, Adam moments, schedule) must come back from the store.
    trainer, tokenizer = new_trainer(RL)
    trainer.load_state(store, "trainer/zero")
    steps.append(step(trainer))
    export_hf(trainer, store, "export", tokenizer)
    trainer.reset_optimizer()
    steps.append(step(trainer))
    del trainer

    sgd, _ = new_trainer(RL_SGD)
    sgd_step = step(sgd)
    del sgd
    zero2, _ = new_trainer(RL, zero_stage=2)
    zero2_step = step(zero2)
    if steps[0][1] is not None:  # rank 0 holds the gathered weights
        store.put("results.pt", _to_bytes({"adamw": steps, "sgd": sgd_step, "zero2": zero2_step}))
    return {"step_s": step_s}


# One Ray Train run for all of these (starting its worker processes takes ~20 s here).
@pytest.fixture(scope="module")
def zero3_run(ray_local, groups, tmp_path_factory):
    from cropi.executors.ray.train_run import run_on_ray_train

    store = LocalStore(tmp_path_factory.mktemp("zero3-store"))
    cfg = {"store_url": store.url, "model": resolve_model_path(TEST_MODEL), "groups": groups}
    returned = run_on_ray_train(zero3_scenario, cfg, workers=2)
    results = torch.load(io.BytesIO(store.get("results.pt")))
    return store, returned, results


def _assert_same_stats(got: dict, want: dict, rel: float = 1e-5) -> None:
    assert got.keys() == want.keys()
    assert got == pytest.approx(want, rel=rel, abs=1e-7)


def _assert_same_step(got: tuple[dict, dict], want: tuple[dict, dict], stats_rel: float = 1e-5) -> None:
    """An AdamW step: same stats; every weight within 2 lr of the reference, all but 1% within 1e-6.

    Sharding only reorders float sums (weights agree to ~1e-7). But Adam's update is lr * m / (sqrt(v) +
    eps), about sign(g) * lr on the first steps after a (re)start: for the rare coordinate whose gradient
    is itself ~eps (1e-8), a 1e-10 rounding difference can move its update by up to the whole step
    (measured right after a reset: one of 1.07M weights 0.8 lr apart, 0.21% of them beyond 1e-6; on the
    earlier test model 0.006%). No update moves a weight by more than ~lr, so 2 lr bounds any rounding
    story; a real bug (scale, shard, schedule, lost moments) moves most weights, far more than 1%.
    """
    (got_stats, got_weights), (want_stats, want_weights) = got, want
    _assert_same_stats(got_stats, want_stats, stats_rel)
    assert got_weights.keys() == want_weights.keys()
    for name in want_weights:
        torch.testing.assert_close(got_weights[name], want_weights[name], atol=2 * want_stats["lr"], rtol=0,
                                   msg=lambda m, name=name: f"{name}: {m}")
    diff = torch.cat([(got_weights[k] - want_weights[k]).abs().flatten() for k in want_weights])
    assert (diff > 1e-6).float().mean().item() < 1e-2


@pytest.mark.slow
def test_one_zero3_step_on_two_ray_workers_matches_the_single_process_step(zero3_run, reference, tiny_model):
    _, returned, results = zero3_run
    want = reference["adamw"][0]

    assert want[0]["grad_norm"] > 0 and want[0]["loss"] != 0  # mixed rewards: a real update
    moved = max((want[1][k] - v).abs().max().item() for k, v in tiny_model[0].state_dict().items())
    assert moved > want[0]["lr"] / 2  # well beyond the tolerance
    _assert_same_step(results["adamw"][0], want)
    assert returned["step_s"] > 0  # rank 0's return value comes back


@pytest.mark.slow
def test_optimizer_state_restored_from_the_store_gives_the_reference_second_step(zero3_run, reference):
    _, _, results = zero3_run
    got = results["adamw"][1]

    assert got[0]["lr"] == pytest.approx(2 * RL.lr / RL.warmup_steps)  # the schedule came back too
    assert reference["adamw"][1][0]["kl"] > 0  # the policy has left the reference
    _assert_same_step(got, reference["adamw"][1])


@pytest.mark.slow
def test_reset_optimizer_restarts_moments_and_warmup_like_the_reference(zero3_run, reference):
    _, _, results = zero3_run
    got = results["adamw"][2]

    assert got[0]["lr"] == pytest.approx(RL.lr / RL.warmup_steps)
    # This step's statistics are computed at weights that two AdamW steps already moved apart by the
    # rounding bound above (a few coordinates by ~1 % of lr): measured up to 3e-5 relative (kl, grad norm).
    _assert_same_step(got, reference["adamw"][2], stats_rel=1e-4)


@pytest.mark.slow
def test_sgd_weights_match_so_the_gradient_scale_across_ranks_is_right(zero3_run, reference, tiny_model):
    _, _, results = zero3_run
    (got_stats, got_weights), (want_stats, want_weights) = results["sgd"], reference["sgd"]

    _assert_same_stats(got_stats, want_stats)
    moved = max((want_weights[k] - v).abs().max().item() for k, v in tiny_model[0].state_dict().items())
    assert moved > 1e-3
    for name in want_weights:  # SGD's update is lr * g: rounding stays rounding
        torch.testing.assert_close(got_weights[name], want_weights[name], atol=1e-6, rtol=1e-5,
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.slow
def test_a_zero2_step_matches_the_single_process_step_too(zero3_run, reference):
    _, _, results = zero3_run
    _assert_same_step(results["zero2"], reference["adamw"][0])


@pytest.mark.slow
def test_every_rank_stores_its_own_checkpoint_shard(zero3_run):
    store, _, _ = zero3_run
    names = [key.rsplit("/", 1)[1] for key in store.list("trainer/zero/")]
    for rank in (0, 1):
        assert f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" in names
        assert f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt" in names
    assert "manifest.json" in names


@pytest.mark.slow
def test_the_hf_export_loads_with_transformers_and_equals_the_gathered_weights(zero3_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    store, _, results = zero3_run
    with tempfile.TemporaryDirectory() as tmp:
        for key in store.list("export/"):
            (Path(tmp) / key.rsplit("/", 1)[1]).write_bytes(store.get(key))
        model = AutoModelForCausalLM.from_pretrained(tmp)
        tokenizer = AutoTokenizer.from_pretrained(tmp)

    gathered = results["adamw"][1][1]
    exported = model.state_dict()
    assert exported.keys() == gathered.keys()
    for name, tensor in gathered.items():
        assert torch.equal(exported[name], tensor), name
    assert tokenizer("1+2=")["input_ids"]


@pytest.mark.parametrize("n", [1, 2, 7, 9, 16])
@pytest.mark.parametrize("world_size, micro_batch", [(2, 2), (3, 4), (4, 1)])
def test_ranks_run_every_sequence_once_in_the_same_number_of_passes(n, world_size, micro_batch):
    from cropi.rl.zero3 import micro_batches

    plans = [micro_batches(n, rank, world_size, micro_batch) for rank in range(world_size)]

    assert len({len(plan) for plan in plans}) == 1  # ZeRO-3's collective gathers line up
    covered = [i for plan in plans for lo, hi in plan for i in range(lo, hi)]
    assert covered == list(range(n))  # contiguous shards, in order, nothing twice
    assert all(hi - lo <= micro_batch for plan in plans for lo, hi in plan)


def fail_on_rank_one(cfg: dict) -> None:
    import ray.train

    if ray.train.get_context().get_world_rank() == 1:
        raise ValueError(cfg["message"])


@pytest.mark.slow
def test_a_failing_rank_fails_the_run_with_its_error(ray_local):
    from cropi.executors.ray.train_run import run_on_ray_train

    with pytest.raises(Exception, match="rank one gave up"):
        run_on_ray_train(fail_on_rank_one, {"message": "rank one gave up"}, workers=2)


def test_micro_batches_sized_in_tokens_take_the_same_step_as_sized_in_rows(tiny_model, groups):
    """`rl.micro_batch_tokens`: rows per pass = budget // padded width; the step is the same sum."""
    import copy

    model, tok = tiny_model
    by_rows = GRPOTrainer(copy.deepcopy(model), copy.deepcopy(model), tok.pad_token_id, RL, TEMPERATURE)
    width = max(len(t.prompt_ids) for g in groups for t in g) + max(len(t.response_ids) for g in groups for t in g)
    tokens_rl = RL.model_copy(update={"micro_batch_tokens": 3 * width})
    by_tokens = GRPOTrainer(copy.deepcopy(model), copy.deepcopy(model), tok.pad_token_id, tokens_rl, TEMPERATURE)
    from cropi.rl.batch import collate

    assert by_tokens.rows_per_pass(collate([t for g in groups for t in g], tok.pad_token_id)) == 3
    a, b = by_rows.step(groups, REWARDS), by_tokens.step(groups, REWARDS)
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    # Adam's first step is sign-like, so a rounding-level gradient difference can move a weight by
    # up to 2 lr; all but a handful of weights agree to 1e-6.
    diff = torch.cat([(p - q).abs().flatten() for p, q in zip(by_rows.model.parameters(),
                                                               by_tokens.model.parameters())])
    assert diff.max() <= 2 * RL.lr and (diff > 1e-6).float().mean() <= 0.01
