"""A stage's selection: computed once from the stage-start policy, recorded in
the store (`jobs/<job>/stages/<s>/selection.json`) and reused from there.

Shared by the embedded run and the services' controller. The controller
runs it with an influence engine that has no model: by then the projector
service has stored every gradient part, and scoring only reads them.
"""

from __future__ import annotations

import json
import time

import numpy as np

from cropi.curriculum import layout
from cropi.curriculum.influence import POOL, InfluenceEngine, Progress
from cropi.curriculum.selectors import (
    KEEP_FIRST,
    NEEDS_INFLUENCE,
    NEEDS_PASS_RATES,
    Selection,
    SelectionContext,
    selector_function,
)
from cropi.data.sources import JobData
from cropi.runtime.store import ObjectStore
from cropi.spec import JobSpec


def needs_offline(spec: JobSpec) -> bool:
    return spec.curriculum.selector in NEEDS_INFLUENCE | NEEDS_PASS_RATES


def keeps_first_choice(spec: JobSpec, stage: int) -> bool:
    """Does stage `stage` reuse stage 0's choice? (the `_once` selectors)"""
    return spec.curriculum.selector in KEEP_FIRST and stage > 0


def needs_projection(spec: JobSpec, stage: int) -> bool:
    """Does stage `stage` need fresh influence gradients? (influence_once keeps stage 0's choice)"""
    return spec.curriculum.selector in NEEDS_INFLUENCE and not keeps_first_choice(spec, stage)


def stored_selection(store: ObjectStore, spec: JobSpec, stage: int) -> Selection | None:
    key = layout.selection_key(spec.name, stage)
    return Selection.from_json(json.loads(store.get(key))) if store.exists(key) else None


def select_stage(spec: JobSpec, data: JobData, store: ObjectStore, influence: InfluenceEngine, stage: int,
                 progress: Progress | None = None, extra_seconds: float = 0.0) -> Selection:
    """The prompts stage `stage` trains on; computed once, then read from the store.

    A resumed run reuses the stored choice: recomputing would score with the
    mid-stage policy, not the one the stage started from. `extra_seconds`
    adds work done elsewhere for this selection (the projector tasks).
    """
    stored = stored_selection(store, spec, stage)
    if stored is not None:
        return stored
    cur = spec.curriculum
    if keeps_first_choice(spec, stage):
        selection = stored_selection(store, spec, 0)
        if selection is None:
            raise RuntimeError(f"{cur.selector}: stage 0's selection is missing from the store ({layout.selection_key(spec.name, 0)})")
        selection.seconds = 0.0  # reusing stage 0's choice costs nothing
        selection.note = "stage 0's selection, kept"
    else:
        t0 = time.perf_counter()
        selection = _compute(spec, data, influence, stage, progress)
        selection.seconds = time.perf_counter() - t0 + extra_seconds
    store.put(layout.selection_key(spec.name, stage),
              json.dumps({"stage": stage, "selector": cur.selector, **selection.to_json()}).encode())
    return selection


def _compute(spec: JobSpec, data: JobData, influence: InfluenceEngine, stage: int,
             progress: Progress | None) -> Selection:
    cur = spec.curriculum
    ids = [p.id for p in data.pool]
    ctx = SelectionContext(stage=stage, prompt_ids=ids, select_ratio=cur.select_ratio, seed=spec.seed)
    if needs_offline(spec):
        groups = {g.prompt_id: g for g in influence.offline[POOL]}
        ctx.pass_rates = np.array([groups[i].pass_rate for i in ids])
        ctx.eligible = np.array([groups[i].eligible for i in ids])
    if cur.selector in NEEDS_INFLUENCE:
        scores = influence.score_stage(stage, progress)
        assert scores.prompt_ids == ids
        ctx.scores, ctx.eligible = scores.scores, scores.eligible
    return selector_function(cur.selector)(ctx)
