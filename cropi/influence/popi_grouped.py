"""Grouped POPI: every group's gradient of its own POPI loss from ONE forward
and ONE backward over a chunk of groups.

The groups of a chunk do not interact in the forward (rows of a batch are
independent given the weights), so the backward of the summed loss gives,
at every layer's output, exactly the gradient each row's own group loss
would give there. A layer's weight gradient for one group is then a sum
over that group's rows only: for a linear layer `D_b^T X_b` (one batched
matmul for all groups), for an embedding a scatter of `D_b` into the rows
of its tokens, for an RMSNorm `sum(D_b * normalised(X_b))`. Each group's
gradients are sketched as they are formed, one layer at a time.

Supported: `nn.Linear` (weight, bias), `nn.Embedding`, RMSNorm modules
(weight, `variance_epsilon`/`eps`); a model with any other trainable
module raises `Unsupported` and the caller takes the per-prompt path.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from transformers import PreTrainedModel

from cropi.influence.offline import OfflineGroup
from cropi.influence.popi_batched import _collate_groups
from cropi.rl.batch import response_logits, token_logprobs
from cropi.rl.grpo import group_advantages

AddGradient = Callable[[int, str, torch.Tensor], None]  # (group index in the chunk, parameter name, gradient)


class Unsupported(NotImplementedError):
    """The model has a trainable module whose per-group gradient this path cannot form."""


def _is_rmsnorm(module: nn.Module) -> bool:
    return type(module).__name__.endswith("RMSNorm") and hasattr(module, "weight")


def _param_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    out = []
    for prefix, module in model.named_modules():
        own = [n for n, p in module.named_parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        if not (isinstance(module, (nn.Linear, nn.Embedding)) or _is_rmsnorm(module)):
            raise Unsupported(f"{prefix}: {type(module).__name__}")
        out.append((prefix, module))
    if len({id(p) for _, m in out for p in m.parameters(recurse=False)}) != sum(
            len(list(m.parameters(recurse=False))) for _, m in out):
        raise Unsupported("tied parameters")
    return out


def grouped_gradients(model: PreTrainedModel, groups: Sequence[OfflineGroup], pad_id: int, adv_eps: float,
                      add: AddGradient, temperature: float | None = None,
                      behaviour: PreTrainedModel | None = None) -> None:
    """Call `add(b, name, grad)` with group b's gradient of its POPI loss for every parameter.

    The groups must all be eligible and share their number of responses and sampling
    temperature (`popi_batched.chunks`).
    """
    modules = _param_modules(model)
    n_groups, n = len(groups), len(groups[0].rewards)
    device = next(model.parameters()).device
    batch = _collate_groups(groups, pad_id).to(device)
    sampled_at = groups[0].temperature
    rescore = temperature is not None and temperature != sampled_at
    t = temperature if rescore else sampled_at
    seen: list[tuple[str, nn.Module, torch.Tensor, torch.Tensor]] = []  # (name, module, input, output)

    def capture(name: str) -> Callable:
        def hook(module, inputs, output):
            seen.append((name, module, inputs[0].detach(), output))
        return hook

    handles = [m.register_forward_hook(capture(name)) for name, m in modules]
    try:
        logp = token_logprobs(response_logits(model, batch, t), batch.response_ids)
    finally:
        for h in handles:
            h.remove()
    if rescore:
        with torch.no_grad():
            old = token_logprobs(response_logits(behaviour or model, batch, t), batch.response_ids)
    else:
        old = batch.old_logprobs
    rho = torch.exp(logp - old)
    mask = batch.response_mask
    per_sequence = ((rho * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).view(n_groups, n)
    advantages = group_advantages(torch.tensor([g.rewards for g in groups], dtype=torch.float32), adv_eps).to(device)
    total = -(per_sequence * advantages).mean(-1).sum()  # the sum of the groups' own losses
    if len({name for name, _, _, _ in seen}) != len(seen):
        raise Unsupported("a module with parameters runs more than once per forward")
    output_grads = torch.autograd.grad(total, [o for _, _, _, o in seen], allow_unused=True)
    for (name, module, x, _), d in zip(seen, output_grads):
        if d is None:
            continue
        for param_name, grad in _group_grads(module, x, d, n_groups):
            for b in range(n_groups):
                add(b, f"{name}.{param_name}" if name else param_name, grad[b])


def _group_grads(module: nn.Module, x: torch.Tensor, d: torch.Tensor, n_groups: int):
    """(parameter name, [groups, *shape]) per trainable parameter of `module`."""
    if isinstance(module, nn.Embedding):
        ids = x.reshape(n_groups, -1)
        d = d.reshape(n_groups, ids.shape[1], -1).float()
        grad = torch.zeros(n_groups, module.num_embeddings, d.shape[-1], dtype=torch.float32, device=d.device)
        grad.scatter_add_(1, ids[..., None].expand(-1, -1, d.shape[-1]), d)
        if module.padding_idx is not None:
            grad[:, module.padding_idx] = 0  # as autograd: the padding row never gets a gradient
        yield "weight", grad
        return
    x = x.reshape(n_groups, -1, x.shape[-1]).float()
    d = d.reshape(n_groups, -1, d.shape[-1]).float()
    if isinstance(module, nn.Linear):
        if module.weight.requires_grad:
            yield "weight", torch.bmm(d.transpose(1, 2), x)
        if module.bias is not None and module.bias.requires_grad:
            yield "bias", d.sum(1)
        return
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6))
    normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    yield "weight", (d * normed.to(module.weight.dtype).float()).sum(1)
