"""POPI: the off-policy policy gradient of one prompt at the current policy
(docs/design.md §2.2), projected as backward produces it.

For a prompt x with offline group o_1..o_G (sampled by the behaviour policy
beta, rewards r_i):

    A_i      = (r_i - mean r) / (std r + eps)              unbiased std
    rho_i,t  = exp(log pi_theta(o_i,t) - log pi_beta(o_i,t))   not clipped
    L_x      = -(1/G) sum_i (1/|o_i|) sum_t rho_i,t * A_i
    g(x)     = grad_theta L_x

No new rollouts are needed: the current policy only re-scores the stored
responses. By default log-probs use the temperature the responses were
sampled at, so that rho = 1 exactly when theta = beta and the stored
behaviour log-probs serve as log pi_beta. With `influence.logprob_temperature`
set (the reference code uses 1.0), both policies are re-scored at that
temperature: pi_beta by the base model (`behaviour`), since the stored
log-probs are tempered.

The gradient never exists as one flat vector: a post-accumulate hook on each
parameter hands its gradient to the projector's accumulator and frees it, so
peak memory stays at or below that of a plain backward.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedModel

from cropi.influence.offline import OfflineGroup
from cropi.influence.popi_batched import chunks
from cropi.influence.param_subset import only_these_trainable, select_parameters
from cropi.influence.popi_grouped import grouped_gradients, supports_grouped
from cropi.rl.batch import collate, response_logits, token_logprobs
from cropi.rl.grpo import group_advantages
from cropi.rollout.base import Trajectory


def group_batch(group: OfflineGroup, pad_id: int):
    trajectories = [
        Trajectory(prompt_ids=group.prompt_ids, response_ids=r, logprobs=lp, text="", finished=True)
        for r, lp in zip(group.response_ids, group.logprobs)
    ]
    return collate(trajectories, pad_id)


def popi_loss(model: PreTrainedModel, group: OfflineGroup, pad_id: int, adv_eps: float = 1e-4,
              temperature: float | None = None, behaviour: PreTrainedModel | None = None) -> torch.Tensor:
    """L_x(theta) for one prompt's offline group.

    `temperature` None scores at the sampling temperature against the stored
    log-probs; a number re-scores `model` and `behaviour` (the base policy;
    None: `model` is the base policy) at that temperature.
    """
    device = next(model.parameters()).device
    batch = group_batch(group, pad_id).to(device)
    if temperature is None or temperature == group.temperature:
        logp = token_logprobs(response_logits(model, batch, group.temperature), batch.response_ids)
        old_logp = batch.old_logprobs
    else:
        logp = token_logprobs(response_logits(model, batch, temperature), batch.response_ids)
        with torch.no_grad():
            old_logp = token_logprobs(response_logits(behaviour or model, batch, temperature), batch.response_ids)
    rho = torch.exp(logp - old_logp)
    mask = batch.response_mask
    per_sequence = (rho * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
    advantages = group_advantages(torch.tensor([group.rewards], dtype=torch.float32), adv_eps)[0].to(device)
    return -(per_sequence * advantages).mean()


#: Memory for the per-group fp32 copies of one layer's weight gradient in a batched pass.
_GROUP_GRADIENT_BYTES = 1 << 30


class _Rows:
    """`new_batch` for a projector that has only `new_accumulator` (the dense reference)."""

    def __init__(self, projector, rows: int) -> None:
        self.accumulators = [projector.new_accumulator() for _ in range(rows)]

    def add(self, name: str, grads: torch.Tensor) -> None:
        for acc, grad in zip(self.accumulators, grads):
            acc.add(name, grad)

    def results(self) -> list[torch.Tensor]:
        return [acc.result() for acc in self.accumulators]


def _batch_of(projector, rows: int):
    return projector.new_batch(rows) if hasattr(projector, "new_batch") else _Rows(projector, rows)


@dataclass
class ProjectedGradients:
    prompt_ids: list[str]
    vectors: np.ndarray  # [N, k] fp32; zero rows for ineligible prompts
    norms: np.ndarray  # [N] L2 norm of each projected gradient
    eligible: np.ndarray  # [N] bool


class POPIProjector:
    """Projects per-prompt POPI gradients of `model` with `projector`.

    `projector` needs `dim` and `new_accumulator()` returning an object with
    `add(name, grad)` and `result() -> torch.Tensor [k]`.
    """

    def __init__(self, model: PreTrainedModel, projector, pad_id: int, adv_eps: float = 1e-4,
                 temperature: float | None = None, behaviour: PreTrainedModel | None = None,
                 batch_tokens: int | None = None, params: Sequence[str] | None = None):
        """`batch_tokens`: project chunks of groups whose padded batch holds at most this many tokens
        in one pass (`popi_grouped.py`); None: one backward per prompt. `params`: patterns of the
        parameters to take gradients of (`param_subset.py`); None: all trainable ones."""
        self.batch_tokens = batch_tokens
        self.params = select_parameters(model, params) if params else None
        self.model = model
        self.projector = projector
        self.pad_id = pad_id
        self.adv_eps = adv_eps
        self.temperature = temperature
        self.behaviour = behaviour
        self._acc = None
        self._handles = [
            p.register_post_accumulate_grad_hook(self._hook(name))
            for name, p in model.named_parameters()
            if p.requires_grad
        ]

    def _hook(self, name: str) -> Callable[[torch.Tensor], None]:
        def hook(param: torch.Tensor) -> None:
            if self._acc is not None:
                self._acc.add(name, param.grad)
                param.grad = None  # projected: the full gradient is never kept

        return hook

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def project_group(self, group: OfflineGroup) -> torch.Tensor | None:
        """z(x) = P g(x), or None for an ineligible (all-equal rewards) prompt."""
        if len(set(group.rewards)) <= 1:
            return None
        self.model.zero_grad(set_to_none=True)
        self._acc = self.projector.new_accumulator()
        try:
            popi_loss(self.model, group, self.pad_id, self.adv_eps, self.temperature, self.behaviour).backward()
            return self._acc.result()
        finally:
            self._acc = None

    def _project_batched(self, groups: Sequence[OfflineGroup],
                         progress: Callable[[int], None] | None) -> list[torch.Tensor | None]:
        rows: list[torch.Tensor | None] = [None] * len(groups)
        eligible = [i for i, g in enumerate(groups) if len(set(g.rewards)) > 1]
        if progress is not None and len(groups) > len(eligible):
            progress(len(groups) - len(eligible))
        # Similar lengths together: a chunk pads every prompt and every response to its longest.
        eligible.sort(key=lambda i: (max(map(len, groups[i].response_ids)), len(groups[i].prompt_ids), i))
        largest = max(p.numel() for p in self.model.parameters() if p.requires_grad)
        max_groups = max(1, _GROUP_GRADIENT_BYTES // (4 * largest))
        for chunk in chunks([groups[i] for i in eligible], self.batch_tokens, max_groups):
            members = [eligible[j] for j in chunk]
            batch = _batch_of(self.projector, len(members))
            grouped_gradients(self.model, [groups[i] for i in members], self.pad_id, self.adv_eps, batch.add,
                              self.temperature, self.behaviour)
            for row, i in zip(batch.results(), members):
                rows[i] = row
            if progress is not None:
                progress(len(members))
        return rows

    def project_groups(
        self, groups: Sequence[OfflineGroup], progress: Callable[[int], None] | None = None
    ) -> ProjectedGradients:
        was_training = self.model.training
        self.model.eval()  # no dropout: the gradient must be a function of theta alone
        rows: list[torch.Tensor | None] = []
        try:
            with only_these_trainable(self.model, self.params):
                rows = self._project_all(groups, progress)
        finally:
            self.model.train(was_training)
        vectors = np.zeros((len(groups), self.projector.dim), dtype=np.float32)
        for i, z in enumerate(rows):
            if z is not None:
                vectors[i] = z.detach().cpu().numpy()
        return ProjectedGradients(
            prompt_ids=[g.prompt_id for g in groups],
            vectors=vectors,
            norms=np.linalg.norm(vectors, axis=1),
            eligible=np.array([z is not None for z in rows], dtype=bool),
        )

    def _project_all(self, groups: Sequence[OfflineGroup],
                     progress: Callable[[int], None] | None) -> list[torch.Tensor | None]:
        if self.batch_tokens and supports_grouped(self.model):
            return self._project_batched(groups, progress)
        rows: list[torch.Tensor | None] = []  # else one backward per prompt
        for group in groups:
            rows.append(self.project_group(group))
            if progress is not None:
                progress(1)
        return rows


def full_flat_gradient(model: PreTrainedModel, loss_fn: Callable[[], torch.Tensor]) -> Iterable[tuple[str, torch.Tensor]]:
    """Reference for tests: the autograd gradient of `loss_fn()` per named parameter."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss_fn(), [p for _, p in params], allow_unused=True)
    return [(n, g if g is not None else torch.zeros_like(p)) for (n, p), g in zip(params, grads)]
