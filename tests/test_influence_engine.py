"""The influence engine end to end on the tiny model: offline trajectories,
stage scores, and resumption from what is already stored."""

import numpy as np
import pytest

from cropi.data.sources import load_job_data
from cropi.curriculum.influence import InfluenceEngine
from cropi.rollout.hf import HFRolloutEngine
from cropi.runtime.store import LocalStore
from cropi.spec import parse_spec

from .conftest import TEST_MODEL


@pytest.fixture
def spec():
    return parse_spec({
        "name": "infl",
        "model": {"path": TEST_MODEL},
        "data": {
            "pool": {"source": "builtin:arith?digits=1", "size": 40},
            "validation": [{"name": "add1", "source": "builtin:arith?skills=add&digits=1", "size": 12}],
        },
        "rollout": {"max_new_tokens": 4},
        "offline": {"n_pool": 4, "n_valid": 4, "temperature": 1.0},
        "influence": {"proj_dim": 256, "max_valid_prompts": 8},
    })


def test_scores_are_stored_per_part_and_resumed_without_recomputation(spec, tiny_model, tmp_path, mixed_rewards,
                                                                      monkeypatch):
    model, tok = tiny_model
    store = LocalStore(tmp_path)
    data = load_job_data(spec)
    engine = InfluenceEngine(spec, store, model, tok, part_size=16)
    engine.collect_offline(HFRolloutEngine(model, tok), data)
    assert len(engine.offline["pool"]) == len(data.pool)
    first = engine.score_stage(0)
    keys = store.list("jobs/infl/stages/0/grads/")
    assert any("/pool/part-00002.npy" in k for k in keys) and any("/valid-add1/" in k for k in keys)
    assert first.prompt_ids == [p.id for p in data.pool]
    assert set(first.scores) == {"add1"}
    s = first.scores["add1"]
    assert np.all(np.isneginf(s[~first.eligible]))
    assert np.all((s[first.eligible] >= -1) & (s[first.eligible] <= 1))

    # A second engine over the same store computes nothing: every part is loaded.
    again = InfluenceEngine(spec, store, model, tok, part_size=16)
    again.collect_offline(HFRolloutEngine(model, tok), data)
    monkeypatch.setattr("cropi.influence.popi.POPIProjector.project_groups",
                        lambda *a, **k: pytest.fail("recomputed a stored part"))
    second = again.score_stage(0)
    assert np.array_equal(second.scores["add1"], s)


def _groups(rewards_by_id):
    from cropi.influence.offline import OfflineGroup

    return [OfflineGroup(prompt_id=i, prompt_ids=[1], response_ids=[[2], [3]], logprobs=[[0.0], [0.0]],
                         rewards=r, temperature=0.5) for i, r in rewards_by_id.items()]


def test_validation_targets_are_a_seeded_choice_among_eligible_prompts_only(spec, tmp_path):
    spec.influence.max_valid_prompts = 3
    engine = InfluenceEngine(spec, LocalStore(tmp_path))
    valid = {f"v{i}": ([0.0, 1.0] if i % 2 else [1.0, 1.0]) for i in range(12)}  # odd ids are eligible
    engine.offline = {"pool": _groups({"p0": [0.0, 1.0]}), "valid-add1": _groups(valid)}
    sets = dict(engine._stage_groups(0))
    chosen = [g.prompt_id for g in sets["valid-add1"]]
    assert len(chosen) == 3 and all(g.eligible for g in sets["valid-add1"])
    assert chosen == [g.prompt_id for g in dict(engine._stage_groups(0))["valid-add1"]]  # seeded
    other_seed = InfluenceEngine(spec.model_copy(update={"influence": spec.influence.model_copy(update={"seed": 1})}),
                                 engine.store)
    other_seed.offline = engine.offline
    assert [g.prompt_id for g in dict(other_seed._stage_groups(0))["valid-add1"]] != chosen
    # Fewer eligible prompts than the cap: all of them, and never an ineligible one.
    spec.influence.max_valid_prompts = 100
    assert sorted(g.prompt_id for g in dict(engine._stage_groups(0))["valid-add1"]) == sorted(
        i for i, r in valid.items() if r == [0.0, 1.0])


def test_logprobs_at_another_temperature_need_the_base_model_after_stage_zero(spec, tmp_path):
    engine = InfluenceEngine(spec, LocalStore(tmp_path))
    assert not engine.needs_behaviour_model(1)  # default: sampling temperature, stored log-probs
    spec.influence.logprob_temperature = 1.0  # offline temperature is 1.0 in this spec
    assert not engine.needs_behaviour_model(1)
    spec.offline.temperature = 0.5
    assert not engine.needs_behaviour_model(0) and engine.needs_behaviour_model(1)


def test_logprob_temperature_accepts_the_sampling_keyword():
    assert parse_spec({"influence": {"logprob_temperature": "sampling"}}).influence.logprob_temperature is None
    assert parse_spec({"influence": {"logprob_temperature": 1.0}}).influence.logprob_temperature == 1.0


def test_candidates_are_a_seeded_draw_of_eligible_pool_prompts_new_each_stage(spec, tmp_path):
    spec.influence.candidates = 4
    engine = InfluenceEngine(spec, LocalStore(tmp_path))
    pool = {f"p{i:02d}": ([0.0, 1.0] if i % 3 else [1.0, 1.0]) for i in range(30)}  # i % 3 == 0: ineligible
    engine.offline = {"pool": _groups(pool), "valid-add1": _groups({"v": [0.0, 1.0]})}
    draws = [[g.prompt_id for g in engine.candidates(stage)] for stage in (0, 1, 2)]
    assert all(len(d) == 4 and d == sorted(d) for d in draws)
    assert all(int(pid[1:]) % 3 for d in draws for pid in d)  # eligible ones only
    assert draws[0] == [g.prompt_id for g in engine.candidates(0)]  # seeded
    assert len({tuple(d) for d in draws}) == 3  # a new subset each stage
    assert [g.prompt_id for g in dict(engine._stage_groups(1))["pool"]] == draws[1]
    spec.influence.candidates = 1000  # more than there are: every eligible prompt
    assert len(engine.candidates(0)) == 20


def test_a_stage_with_candidates_scores_them_and_no_other_prompt(spec, tiny_model, tmp_path, mixed_rewards):
    model, tok = tiny_model
    spec.influence.candidates = 6
    data = load_job_data(spec)
    engine = InfluenceEngine(spec, LocalStore(tmp_path), model, tok, part_size=16)
    engine.collect_offline(HFRolloutEngine(model, tok), data)
    scores = engine.score_stage(1)
    chosen = {g.prompt_id for g in engine.candidates(1)}
    assert scores.prompt_ids == [p.id for p in data.pool]  # laid out over the whole pool
    assert {pid for pid, ok in zip(scores.prompt_ids, scores.eligible) if ok} <= chosen
    assert scores.eligible.sum() == len(chosen) == 6
    assert np.isfinite(scores.scores["add1"][scores.eligible]).all()
