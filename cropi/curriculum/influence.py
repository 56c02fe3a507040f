"""The influence engine of a job's curriculum: offline trajectories once per
job, then, at each stage, projected POPI gradients of every pool prompt and of
the validation targets at the current policy, and the cosine scores
(docs/design.md §2.1-2.5). It applies the stage-free parts of
`cropi.influence` (offline, popi, projection, gradstore, scoring) to a job's
sets and stages, under the keys of `layout.py`.

Every product goes to the object store in parts; a part already there is
loaded, not recomputed, so a stage interrupted halfway resumes where it was.
A stored part that does not read back whole (`CorruptPart`: a flipped byte, a
truncated write) counts as missing: it is recomputed (the same bytes, since
every part is a deterministic function of the spec and the stage-start
policy) and a warning naming its key is reported. An engine without the
model a part needs asks its `recompute` source (the embedded run's and the
inline executor's task handlers); with none it raises the `CorruptPart`.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

import numpy as np
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from cropi.data.sources import JobData
from cropi.data.types import Prompt
from cropi.curriculum import layout
from cropi.influence.gradstore import concat, exists_projected, load_projected, save_projected
from cropi.influence.offline import CorruptPart, OfflineGroup, collect_offline_part, read_offline_part
from cropi.influence.popi import POPIProjector, ProjectedGradients
from cropi.influence.projection import SparseProjector
from cropi.influence.scoring import choose_target_prompts, cosine_scores, target_vector
from cropi.rollout.base import RolloutEngine
from cropi.runtime.store import ObjectStore
from cropi.seeding import stream_seed
from cropi.spec import JobSpec

Progress = Callable[[str, int, int], None]  # (phase, done, total)

POOL = "pool"

log = logging.getLogger(__name__)
T = TypeVar("T")


class PartSource(Protocol):
    """Recomputes and stores one part for an engine that cannot itself (it has no model, or no
    rollout engine): whoever holds the models, e.g. the embedded run's task handlers. It replaces
    a stored part it finds unreadable, and reports that (the engine that asked does not)."""

    def offline_part(self, set_name: str, index: int) -> None: ...

    def project_part(self, stage: int, set_name: str, index: int) -> None: ...


def _log_warning(message: str, **data) -> None:
    log.warning("%s", message)


def valid_set_name(name: str) -> str:
    return f"valid-{name}"


@dataclass
class StageScores:
    prompt_ids: list[str]
    eligible: np.ndarray  # [N] bool
    scores: dict[str, np.ndarray]  # validation set -> [N] cosine (-inf where ineligible)


def _over_the_pool(scored: ProjectedGradients, pool_ids: list[str]) -> ProjectedGradients:
    """The projections of the scored candidates laid out over the whole pool: the prompts not
    scored this stage get zero rows and are not eligible."""
    if scored.prompt_ids == pool_ids:
        return scored
    rows = {pid: i for i, pid in enumerate(scored.prompt_ids)}
    at = np.array([rows.get(pid, -1) for pid in pool_ids])
    hit = at >= 0
    vectors = np.zeros((len(pool_ids), scored.vectors.shape[1]), dtype=scored.vectors.dtype)
    vectors[hit] = scored.vectors[at[hit]]
    norms, eligible = np.zeros(len(pool_ids), scored.norms.dtype), np.zeros(len(pool_ids), bool)
    norms[hit], eligible[hit] = scored.norms[at[hit]], scored.eligible[at[hit]]
    return ProjectedGradients(prompt_ids=list(pool_ids), vectors=vectors, norms=norms, eligible=eligible)


class InfluenceEngine:
    def __init__(self, spec: JobSpec, store: ObjectStore, model: PreTrainedModel | None = None,
                 tokenizer: PreTrainedTokenizerBase | None = None,
                 part_size: int = 256, behaviour: PreTrainedModel | None = None):
        self.spec = spec
        self.store = store
        self.model = model
        self.tokenizer = tokenizer
        self.behaviour = behaviour  # the base model, for log-probs at a temperature other than the sampling one
        self.part_size = part_size
        inf = spec.influence
        self.projector = SparseProjector(inf.proj_dim, inf.sparse_ratio, inf.seed)
        self.offline: dict[str, list[OfflineGroup]] = {}
        # Who recomputes a missing or unreadable part this engine has no model (or rollout engine) for.
        self.recompute: PartSource | None = None
        # Told of each unreadable stored part, as `warn(message, key=...)`: a job's warning event where
        # the caller has its registry, the log otherwise. The message names the key, never the data.
        self.warn: Callable[..., None] = _log_warning

    def _stored(self, read: Callable[[], T], key: str, redo: str | None) -> T | None:
        """`read()`, or None when the part at `key` is missing, or unreadable and about to be
        recomputed: here as `redo` says (a warning naming the key), or with `redo` "" by the
        `recompute` source (which reports it). With `redo` None an unreadable part raises."""
        try:
            return read()
        except FileNotFoundError:
            return None
        except CorruptPart as bad:
            if redo is None:
                raise
            if redo:
                self.warn(f"{bad}; {redo}", key=key)
            return None

    # ------------------------------------------------------------------ offline
    def offline_sets(self, data: JobData) -> list[tuple[str, list[Prompt], int]]:
        """(set name, prompts, responses per prompt) for the pool and every validation set."""
        off = self.spec.offline
        return [(POOL, data.pool, off.n_pool)] + [
            (valid_set_name(name), prompts, off.n_valid) for name, prompts in data.validation.items()
        ]

    def offline_parts(self, data: JobData) -> list[tuple[str, int]]:
        """Every (set, part index) of the offline trajectories: one task each in the services."""
        return [(set_name, index) for set_name, prompts, _ in self.offline_sets(data)
                for index in range(math.ceil(len(prompts) / self.part_size))]

    def _offline_chunk(self, data: JobData, set_name: str, index: int) -> tuple[str, list[Prompt], int]:
        """(key, prompts, responses per prompt) of one offline part."""
        _, prompts, n = next(s for s in self.offline_sets(data) if s[0] == set_name)
        chunk = prompts[index * self.part_size : (index + 1) * self.part_size]
        return layout.offline_part_key(self.spec.name, set_name, index), chunk, n

    def _stored_offline(self, key: str, chunk: list[Prompt], n: int, redo: str | None) -> list[OfflineGroup] | None:
        if not self.store.exists(key):
            return None
        return self._stored(lambda: read_offline_part(self.store, key, [p.id for p in chunk], n), key, redo)

    def _sample_offline(self, engine: RolloutEngine, key: str, set_name: str, chunk: list[Prompt], index: int,
                        n: int) -> None:
        off = self.spec.offline
        collect_offline_part(engine, self.store, key, set_name, chunk, index, n, off.temperature,
                             self.spec.rollout.max_new_tokens, self.spec.seed, replace=True)

    def collect_offline_part(self, engine: RolloutEngine, data: JobData, set_name: str, index: int) -> None:
        """Sample and store one part (no-op when stored and readable; an unreadable one is sampled again)."""
        key, chunk, n = self._offline_chunk(data, set_name, index)
        if self._stored_offline(key, chunk, n, "sampling it again") is None:
            self._sample_offline(engine, key, set_name, chunk, index, n)

    def _offline_groups(self, engine: RolloutEngine | None, data: JobData, set_name: str,
                        index: int) -> list[OfflineGroup]:
        """One part's groups: read when stored and readable, else sampled (or recomputed) and read back."""
        key, chunk, n = self._offline_chunk(data, set_name, index)
        redo = "sampling it again" if engine is not None else "" if self.recompute is not None else None
        groups = self._stored_offline(key, chunk, n, redo)
        if groups is not None:
            return groups
        if engine is not None:
            self._sample_offline(engine, key, set_name, chunk, index, n)
        elif self.recompute is not None:
            self.recompute.offline_part(set_name, index)
        else:
            raise FileNotFoundError(f"offline part {key!r} is not in the store and this engine cannot sample it")
        return read_offline_part(self.store, key, [p.id for p in chunk], n)

    def collect_offline(self, engine: RolloutEngine | None, data: JobData, progress: Progress | None = None) -> None:
        """Sample (or load) the behaviour policy's trajectories for the pool and validation sets.

        With every part already stored (the services' controller), no engine is needed. A part
        missing or unreadable is sampled with `engine`, or by `recompute` without one.
        """
        for set_name, prompts, _ in self.offline_sets(data):
            groups: list[OfflineGroup] = []
            for index in range(math.ceil(len(prompts) / self.part_size)):
                groups += self._offline_groups(engine, data, set_name, index)
                if progress:
                    progress(f"offline {set_name}", min((index + 1) * self.part_size, len(prompts)), len(prompts))
            self.offline[set_name] = groups

    def load_offline(self, data: JobData) -> None:
        self.collect_offline(None, data)

    # ------------------------------------------------------------------ stage
    def _stage_groups(self, stage: int) -> list[tuple[str, list[OfflineGroup]]]:
        """What a stage projects: the chosen target prompts of each validation set, then the pool
        (its seeded candidates for this stage, with `influence.candidates`)."""
        inf = self.spec.influence
        sets = []
        for name in (v.name for v in self.spec.data.validation):
            set_name = valid_set_name(name)
            # Only prompts with mixed offline rewards have a gradient; averaging in the
            # others' zero rows would shrink the target (the reference code drops them too).
            eligible = [g.prompt_id for g in self.offline[set_name] if g.eligible]
            chosen = set(choose_target_prompts(eligible, inf.max_valid_prompts, inf.seed, name))
            groups = self.offline[set_name]
            sets.append((set_name, [g for g in groups if g.prompt_id in chosen]))
        sets.append((POOL, self.candidates(stage)))
        return sets

    def candidates(self, stage: int) -> list[OfflineGroup]:
        """The pool groups stage `stage` scores: all of them, or `influence.candidates` of the
        eligible ones drawn by a seeded choice of their own for each stage (in pool order)."""
        pool, n = self.offline[POOL], self.spec.influence.candidates
        eligible = [i for i, g in enumerate(pool) if g.eligible]
        if n is None or n >= len(eligible):
            return pool if n is None else [pool[i] for i in eligible]
        rng = random.Random(stream_seed("candidates", self.spec.influence.seed, stage))
        return [pool[i] for i in sorted(rng.sample(eligible, n))]

    def stage_parts(self, stage: int) -> list[tuple[str, int]]:
        """Every (set, part index) a stage projects: one `project` task each in the services."""
        return [(set_name, index) for set_name, groups in self._stage_groups(stage)
                for index in range(math.ceil(len(groups) / self.part_size))]

    def _stage_chunk(self, stage: int, set_name: str, index: int) -> list[OfflineGroup]:
        groups = dict(self._stage_groups(stage))[set_name]
        return groups[index * self.part_size : (index + 1) * self.part_size]

    def _stored_projected(self, key: str, chunk: list[OfflineGroup], redo: str | None) -> ProjectedGradients | None:
        if not exists_projected(self.store, key):
            return None
        ids, dim = [g.prompt_id for g in chunk], self.projector.dim
        return self._stored(lambda: load_projected(self.store, key, ids, dim), key, redo)

    def project_part(self, stage: int, set_name: str, index: int, popi: POPIProjector) -> None:
        """Project and store one part at the current policy (no-op when stored and readable; an
        unreadable one is projected again)."""
        key = layout.grads_key(self.spec.name, stage, set_name, index)
        chunk = self._stage_chunk(stage, set_name, index)
        if self._stored_projected(key, chunk, "projecting it again") is None:
            self._project(stage, key, chunk, popi)

    def _project(self, stage: int, key: str, chunk: list[OfflineGroup], popi: POPIProjector) -> None:
        if self.needs_behaviour_model(stage) and popi.behaviour is None:
            raise RuntimeError(f"stage {stage}: influence.logprob_temperature needs the base model to re-score "
                               "the offline responses; none was given to the influence engine")
        save_projected(self.store, key, popi.project_groups(chunk), self.projector.describe())

    def needs_behaviour_model(self, stage: int) -> bool:
        """Must stage `stage` re-score the offline responses with the base model?

        Only when log-probs are recomputed at a temperature other than the
        sampling one, and only after stage 0 (there the policy is the base).
        """
        t = self.spec.influence.logprob_temperature
        return stage > 0 and t is not None and t != self.spec.offline.temperature

    def popi(self) -> POPIProjector:
        """Gradient hooks on the model (remove them with `.close()`)."""
        if self.model is None:
            raise RuntimeError("this influence engine has no model: it can only read stored gradients")
        inf = self.spec.influence
        return POPIProjector(self.model, self.projector, self.tokenizer.pad_token_id, self.spec.rl.adv_eps,
                             inf.logprob_temperature, self.behaviour, batch_tokens=inf.batch_tokens,
                             params=inf.params)

    def score_stage(self, stage: int, progress: Progress | None = None) -> StageScores:
        """Cosine scores of every pool prompt against every validation target at the current policy.

        Parts already stored are read, not recomputed; with all parts stored
        (the services' projectors wrote them) no model is needed. A part missing
        or unreadable is projected here, or by `recompute` on an engine without a model.
        """
        popi = None
        projected: dict[str, list[ProjectedGradients]] = {}
        try:
            for set_name, groups in self._stage_groups(stage):
                n_parts = math.ceil(len(groups) / self.part_size)
                for index in range(n_parts):
                    key = layout.grads_key(self.spec.name, stage, set_name, index)
                    chunk = groups[index * self.part_size : (index + 1) * self.part_size]
                    by_source = self.model is None and self.recompute is not None
                    redo = "projecting it again" if self.model is not None else "" if by_source else None
                    part = self._stored_projected(key, chunk, redo)
                    if part is None:  # missing, or unreadable (reported): computed here or by `recompute`
                        if by_source:
                            self.recompute.project_part(stage, set_name, index)
                        else:
                            popi = popi or self.popi()
                            self._project(stage, key, chunk, popi)
                        # Always read back: a fresh and a resumed stage then see the same (fp16) numbers.
                        part = load_projected(self.store, key, [g.prompt_id for g in chunk], self.projector.dim)
                    projected.setdefault(set_name, []).append(part)
                    if progress:
                        progress(f"POPI {set_name}", min((index + 1) * self.part_size, len(groups)), len(groups))
        finally:
            if popi is not None:
                popi.close()
        pool = _over_the_pool(concat(projected[POOL]), [g.prompt_id for g in self.offline[POOL]])
        targets = {name: target_vector(concat(projected.get(valid_set_name(name), [])))
                   for name in (v.name for v in self.spec.data.validation)}
        return StageScores(
            prompt_ids=pool.prompt_ids,
            eligible=pool.eligible,
            scores={name: cosine_scores(pool, t) for name, t in targets.items()},
        )
