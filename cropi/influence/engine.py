"""The influence engine: offline trajectories once per job, then, at each
stage, projected POPI gradients of every pool prompt and of the validation
targets at the current policy, and the cosine scores (DESIGN.md §2.1-2.5).

Every product goes to the object store in parts; a part already there is
loaded, not recomputed, so a stage interrupted halfway resumes where it was.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from cropi.data.sources import JobData
from cropi.influence.gradstore import concat, exists_projected, grads_key, load_projected, save_projected
from cropi.influence.offline import OfflineGroup, collect_offline, load_offline
from cropi.influence.popi import POPIProjector, ProjectedGradients
from cropi.influence.projection import SparseProjector
from cropi.influence.scoring import choose_target_prompts, cosine_scores, target_vector
from cropi.rollout.base import RolloutEngine
from cropi.runtime.store import ObjectStore
from cropi.spec import JobSpec

Progress = Callable[[str, int, int], None]  # (phase, done, total)

POOL = "pool"


def valid_set_name(name: str) -> str:
    return f"valid-{name}"


@dataclass
class StageScores:
    prompt_ids: list[str]
    eligible: np.ndarray  # [N] bool
    scores: dict[str, np.ndarray]  # validation set -> [N] cosine (-inf where ineligible)


class InfluenceEngine:
    def __init__(self, spec: JobSpec, store: ObjectStore, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                 part_size: int = 256):
        self.spec = spec
        self.store = store
        self.model = model
        self.tokenizer = tokenizer
        self.part_size = part_size
        inf = spec.influence
        self.projector = SparseProjector(inf.proj_dim, inf.sparse_ratio, inf.seed)
        self.offline: dict[str, list[OfflineGroup]] = {}

    # ------------------------------------------------------------------ offline
    def collect_offline(self, engine: RolloutEngine, data: JobData, progress: Progress | None = None) -> None:
        """Sample (or load) the behaviour policy's trajectories for the pool and validation sets."""
        off, job = self.spec.offline, self.spec.name
        max_new = self.spec.rollout.max_new_tokens
        sets = [(POOL, data.pool, off.n_pool)] + [
            (valid_set_name(name), prompts, off.n_valid) for name, prompts in data.validation.items()
        ]
        for set_name, prompts, n in sets:
            done = 0

            def tick(k: int, set_name: str = set_name, total: int = len(prompts)) -> None:
                nonlocal done
                done += k
                if progress:
                    progress(f"offline {set_name}", done, total)

            collect_offline(engine, self.store, job, set_name, prompts, n, off.temperature, max_new,
                            self.spec.seed, self.part_size, tick)
            self.offline[set_name] = load_offline(self.store, job, set_name)

    # ------------------------------------------------------------------ stage
    def _project_set(self, stage: int, set_name: str, groups: list[OfflineGroup],
                     popi: POPIProjector, progress: Progress | None) -> ProjectedGradients:
        parts = []
        for index, start in enumerate(range(0, len(groups), self.part_size)):
            chunk = groups[start : start + self.part_size]
            key = grads_key(self.spec.name, stage, set_name, index)
            if not exists_projected(self.store, key):
                save_projected(self.store, key, popi.project_groups(chunk), self.projector.describe())
            # Always read back: a fresh and a resumed stage then see the same (fp16) numbers.
            parts.append(load_projected(self.store, key))
            if progress:
                progress(f"POPI {set_name}", min(start + len(chunk), len(groups)), len(groups))
        return concat(parts)

    def score_stage(self, stage: int, progress: Progress | None = None) -> StageScores:
        """Cosine scores of every pool prompt against every validation target at the current policy."""
        inf = self.spec.influence
        popi = POPIProjector(self.model, self.projector, self.tokenizer.pad_token_id, self.spec.rl.adv_eps)
        try:
            targets = {}
            for name in (v.name for v in self.spec.data.validation):
                set_name = valid_set_name(name)
                groups = self.offline[set_name]
                chosen = set(choose_target_prompts([g.prompt_id for g in groups], inf.max_valid_prompts,
                                                   inf.seed, name))
                grads = self._project_set(stage, set_name, [g for g in groups if g.prompt_id in chosen],
                                          popi, progress)
                targets[name] = target_vector(grads)
            pool = self._project_set(stage, POOL, self.offline[POOL], popi, progress)
        finally:
            popi.close()
        return StageScores(
            prompt_ids=pool.prompt_ids,
            eligible=pool.eligible,
            scores={name: cosine_scores(pool, t) for name, t in targets.items()},
        )
