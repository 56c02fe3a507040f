"""Selectors: same interface, seeded, and CROPI's reciprocal-rank fusion."""

import numpy as np
import pytest

from cropi.curriculum.selectors import (
    SELECTORS,
    SelectionContext,
    reciprocal_rank_fusion,
)

IDS = [f"{i:03d}" for i in range(20)]


def ctx(**kw):
    base = dict(stage=0, prompt_ids=IDS, select_ratio=0.2, seed=0,
                pass_rates=np.linspace(0, 1, 20), eligible=np.ones(20, bool),
                scores={"a": np.arange(20.0), "b": -np.arange(20.0)})
    return SelectionContext(**{**base, **kw})


def test_k_is_the_ceiling_of_ratio_times_pool():
    assert ctx(select_ratio=0.1).k == 2 and ctx(select_ratio=0.11).k == 3


@pytest.mark.parametrize("name", sorted(SELECTORS))
def test_every_selector_is_deterministic_for_a_seed(name):
    a, b = SELECTORS[name](ctx()), SELECTORS[name](ctx())
    assert a.prompt_ids == b.prompt_ids
    assert len(set(a.prompt_ids)) == len(a.prompt_ids)
    assert set(a.prompt_ids) <= set(IDS)


def test_random_depends_on_seed_and_stage():
    r = SELECTORS["random"]
    assert r(ctx()).prompt_ids != r(ctx(seed=1)).prompt_ids
    assert r(ctx()).prompt_ids != r(ctx(stage=1)).prompt_ids


def test_learnability_prefers_pass_rates_near_one_half():
    chosen = SELECTORS["learnability"](ctx(pass_rates=np.array([0, 1, 0.5, 0.25, 0.9] + [0] * 15)))
    assert chosen.prompt_ids[:2] == ["002", "003"]


def test_pass_rate_keeps_only_partly_solved_prompts_and_says_when_short():
    p = np.zeros(20)
    p[[3, 7, 11]] = 0.5
    p[5] = 1.0
    sel = SELECTORS["pass_rate"](ctx(pass_rates=p))
    assert sorted(sel.prompt_ids) == ["003", "007", "011"]
    assert "only 3" in sel.note


def test_reciprocal_rank_fusion_by_hand():
    scores = {"a": np.array([0.9, 0.8, 0.1, 0.0]), "b": np.array([0.0, 0.7, 0.9, 0.1])}
    # a ranks 0,1,2 ; b ranks 2,1,3 (k=3). fused: 0:1, 1:1/2+1/2=1, 2:1/3+1=1.333, 3:1/3
    fused = reciprocal_rank_fusion(scores, np.ones(4, bool), 3)
    assert [i for i, _ in fused] == [2, 0, 1]
    assert fused[0][1] == pytest.approx(4 / 3)


def test_cropi_never_picks_ineligible_prompts_and_reports_shortfall():
    eligible = np.zeros(20, bool)
    eligible[[1, 2]] = True
    sel = SELECTORS["cropi"](ctx(eligible=eligible))
    assert sorted(sel.prompt_ids) == ["001", "002"] and sel.eligible == 2 and "only 2 eligible" in sel.note


def test_influence_selectors_need_scores():
    with pytest.raises(ValueError, match="needs influence scores"):
        SELECTORS["cropi"](ctx(scores=None))


def test_once_selectors_make_their_base_selectors_stage_zero_choice():
    from cropi.curriculum.selectors import KEEP_FIRST, selector_function

    for once, base in KEEP_FIRST.items():
        assert selector_function(once) is SELECTORS[base]
    assert selector_function("dynamic")(ctx()).prompt_ids == IDS  # the whole pool: it filters per step instead
