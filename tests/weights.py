"""Test helper: a copy of a model whose weights moved, as a trainer's step would move them."""

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
