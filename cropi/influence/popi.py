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
from cropi.influence.popi_grouped import grouped_gradients
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
                 batch_tokens: int | None = None):
        """`batch_tokens`: project chunks of groups whose padded batch holds at most this many tokens
        in one pass (`popi_batched.py`); None: one backward per prompt."""
        self.batch_tokens = batch_tokens
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
        # Similar widths together: a chunk pads every sequence to its widest one.
        eligible.sort(key=lambda i: (len(groups[i].prompt_ids) + max(map(len, groups[i].response_ids)), i))
        for chunk in chunks([groups[i] for i in eligible], self.batch_tokens):
            members = [eligible[j] for j in chunk]
            accumulators = [self.projector.new_accumulator() for _ in members]
            grouped_gradients(self.model, [groups[i] for i in members], self.pad_id, self.adv_eps,
                              lambda b, name, grad: accumulators[b].add(name, grad), self.temperature,
                              self.behaviour)
            for acc, i in zip(accumulators, members):
                rows[i] = acc.result()
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
            if self.batch_tokens:
                rows = self._project_batched(groups, progress)
            else:
                for group in groups:
                    rows.append(self.project_group(group))
                    if progress is not None:
                        progress(1)
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


def full_flat_gradient(model: PreTrainedModel, loss_fn: Callable[[], torch.Tensor]) -> Iterable[tuple[str, torch.Tensor]]:
    """Reference for tests: the autograd gradient of `loss_fn()` per named parameter."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss_fn(), [p for _, p in params], allow_unused=True)
    return [(n, g if g is not None else torch.zeros_like(p)) for (n, p), g in zip(params, grads)]
