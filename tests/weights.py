"""Test helpers for weights: a copy of a model whose weights moved (as a trainer's step would move
them), and the ways tests read weights back (received, published, gathered from ZeRO-3 ranks)."""

from __future__ import annotations

import copy

import torch


def perturbed(model, seed: int, scale: float = 0.05):
    """A deep copy of `model` with seeded Gaussian noise (x `scale`) added to every parameter."""
    new = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in new.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return new


def hf_apply(model):
    """An `Apply` for `receive_weights` that copies received tensors into a local (HF) model by name."""
    from cropi.executors.ray.weight_sync import copy_weights, named_weights

    targets = dict(named_weights(model))

    def apply(named, version: int) -> None:
        copy_weights(targets, named)

    return apply


def load_published_weights(store, prefix: str, model) -> None:
    """Copy weights published under `prefix` into a local (HF) model; every weight of it must be there."""
    from cropi.executors.ray.weight_sync import copy_weights, named_weights, published_weights

    targets = dict(named_weights(model))
    named = published_weights(store, prefix)
    missing = sorted(set(targets) - {name for name, _ in named})
    if missing:
        raise KeyError(f"weights under {prefix}/ lack {len(missing)} of the model's: {missing[:5]}")
    copy_weights(targets, named)


def full_state_dict(trainer, rank0_only: bool = True):
    """A ZeRO trainer's consolidated weights on CPU (collective: every rank calls it); None off rank 0
    if `rank0_only`. Parameters are gathered one at a time."""
    import deepspeed

    keep = not rank0_only or trainer.rank == 0
    out = {}
    for name, param in trainer.model.named_parameters(remove_duplicate=False):
        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            if keep:
                out[name] = param.detach().to("cpu", copy=True)
    if keep:
        persistent = trainer.model.state_dict().keys()
        out.update({n: b.detach().to("cpu", copy=True) for n, b in trainer.model.named_buffers() if n in persistent})
    return out if keep else None
