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

The prompt is shared by the group's responses, so it runs once per group:
a first forward over one copy of each prompt fills the KV cache (logits for
its last position only), the cache is repeated for the group's responses,
and a second forward runs the response tokens alone. Both passes are rows of
the same groups, so a layer's per-group gradient is the sum over both. On
the tiny arithmetic model a prompt is ~3/4 of every sequence, so this does
about a third of the full-sequence FLOPs.

Supported: `nn.Linear` (weight, bias), `nn.Embedding`, RMSNorm modules
(weight, `variance_epsilon`/`eps`); a model with any other trainable
module raises `Unsupported` and the caller takes the per-prompt path.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn
from transformers import PreTrainedModel

from cropi.influence.offline import OfflineGroup
from cropi.influence.popi_batched import collate_groups
from cropi.rl.batch import TokenBatch, response_logits, token_logprobs
from cropi.rl.grpo import group_advantages

AddGradients = Callable[[str, torch.Tensor], None]  # (parameter name, [groups, *shape] gradients)


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
    return out


def _parameter_names(model: nn.Module, modules: list[tuple[str, nn.Module]]) -> tuple[dict[int, str], dict[str, int]]:
    """The name `named_parameters` gives each parameter (the projector's key), and how many of
    `modules` own it: two for an output head tied to the input embedding."""
    canonical = {id(p): name for name, p in model.named_parameters()}
    owners: dict[str, int] = {}
    for _, module in modules:
        for p in module.parameters(recurse=False):
            owners[canonical[id(p)]] = owners.get(canonical[id(p)], 0) + 1
    return canonical, owners


def supports_grouped(model: nn.Module) -> bool:
    """Can `grouped_gradients` split this model's weight gradients per group?"""
    try:
        _param_modules(model)
    except Unsupported:
        return False
    return True


def grouped_gradients(model: PreTrainedModel, groups: Sequence[OfflineGroup], pad_id: int, adv_eps: float,
                      add: AddGradients, temperature: float | None = None,
                      behaviour: PreTrainedModel | None = None) -> None:
    """Call `add(name, grads)` for every parameter, `grads[b]` being group b's gradient of its own
    POPI loss.

    The groups must all be eligible and share their number of responses and sampling
    temperature (`popi_batched.chunks`).
    """
    modules = _param_modules(model)
    n_groups, n = len(groups), len(groups[0].rewards)
    device = next(model.parameters()).device
    batch = collate_groups(groups, pad_id).to(device)
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
        with _cpu_eager_attention(model):
            logp = token_logprobs(shared_prompt_logits(model, batch, n, t), batch.response_ids)
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
    if len(seen) > 2 * len(modules):
        raise Unsupported("a module with parameters runs more than once per pass")
    output_grads = torch.autograd.grad(total, [o for _, _, _, o in seen], allow_unused=True)
    calls: dict[str, tuple[nn.Module, list[torch.Tensor], list[torch.Tensor]]] = {}  # both passes of a module
    for (name, module, x, _), d in zip(seen, output_grads):
        if d is not None:
            _, xs, ds = calls.setdefault(name, (module, [], []))
            xs.append(_per_group(x, n_groups))
            ds.append(_per_group(d, n_groups))
    canonical, owners = _parameter_names(model, modules)
    tied: dict[str, torch.Tensor] = {}  # a parameter of two modules gets the sum of both parts
    for name, (module, xs, ds) in calls.items():
        for param_name, grad in _group_grads(module, xs, ds):
            key = canonical[id(getattr(module, param_name))]
            if owners[key] == 1:
                add(key, grad)
            else:
                tied[key] = tied[key] + grad if key in tied else grad
    for key, grad in tied.items():
        add(key, grad)


@contextlib.contextmanager
def _cpu_eager_attention(model: PreTrainedModel) -> Iterator[None]:
    """Plain matmul attention on CPU: torch's CPU SDPA kernel spends ~1/5 of a pass on the
    short, many-row attention of scoring (measured on the tiny model); the same maths."""
    before = getattr(model.config, "_attn_implementation", None)
    if next(model.parameters()).device.type != "cpu" or before in (None, "eager") or not hasattr(
            model, "set_attn_implementation"):
        yield
        return
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(before)


def _cache_kwarg(model: PreTrainedModel) -> str:
    # transformers 5.x renamed `past_key_values` to `cache` (the old name warns, then goes away).
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def shared_prompt_logits(model: PreTrainedModel, batch: TokenBatch, n: int, temperature: float) -> torch.Tensor:
    """`response_logits` for a batch of groups of `n` responses each (rows group-major, every
    group's rows sharing one prompt), with each prompt run once instead of `n` times."""
    P, R = batch.prompt_width, batch.response_ids.shape[1]
    head = slice(None, None, n)  # the first row of each group carries its prompt
    prompt = model(input_ids=batch.input_ids[head, :P], attention_mask=batch.attention_mask[head, :P],
                   position_ids=batch.position_ids[head, :P], use_cache=True, logits_to_keep=1)
    first = prompt.logits[:, -1:].repeat_interleave(n, 0)  # predicts response token 0
    if R == 1:
        return first.float() / temperature
    cache = getattr(prompt, "cache", None) or prompt.past_key_values
    cache.batch_repeat_interleave(n)
    # Response tokens 0..R-2 predict tokens 1..R-1; the last token predicts nothing we score.
    rest = model(input_ids=batch.input_ids[:, P:P + R - 1], attention_mask=batch.attention_mask[:, :P + R - 1],
                 position_ids=batch.position_ids[:, P:P + R - 1], use_cache=True, **{_cache_kwarg(model): cache})
    return torch.cat([first, rest.logits], 1).float() / temperature


def _per_group(t: torch.Tensor, n_groups: int) -> torch.Tensor:
    """[groups, rows of the group, features] (token ids: [groups, rows]); rows are group-major."""
    return t.reshape(n_groups, -1) if t.dim() == 2 and not t.is_floating_point() else t.reshape(n_groups, -1, t.shape[-1])


def _group_grads(module: nn.Module, xs: list[torch.Tensor], ds: list[torch.Tensor]):
    """(parameter name, [groups, *shape]) per trainable parameter of `module`, from its inputs
    `xs` and output gradients `ds` in each pass, each [groups, rows, ...]. The passes are
    accumulated in place in a fixed order, never concatenated (a copy of every activation)."""
    n_groups = xs[0].shape[0]
    if isinstance(module, nn.Embedding):
        grad = torch.zeros(n_groups, module.num_embeddings, ds[0].shape[-1], dtype=torch.float32, device=ds[0].device)
        for x, d in zip(xs, ds):
            grad.scatter_add_(1, x[..., None].expand(-1, -1, d.shape[-1]), d.float())
        if module.padding_idx is not None:
            grad[:, module.padding_idx] = 0  # as autograd: the padding row never gets a gradient
        yield "weight", grad
        return
    if isinstance(module, nn.Linear):
        if module.weight.requires_grad:
            grad = None
            for x, d in zip(xs, ds):
                dt, xf = d.float().transpose(1, 2), x.float()
                grad = torch.bmm(dt, xf) if grad is None else grad.baddbmm_(dt, xf)
            yield "weight", grad
        if module.bias is not None and module.bias.requires_grad:
            yield "bias", _summed(d.float().sum(1) for d in ds)
        return
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6))

    def one(x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        x = x.float()
        normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        return (d.float() * normed.to(module.weight.dtype).float()).sum(1)

    yield "weight", _summed(one(x, d) for x, d in zip(xs, ds))


def _summed(parts) -> torch.Tensor:
    total = None
    for part in parts:
        total = part if total is None else total.add_(part)
    return total
