"""`influence.params`: which parameters POPI takes gradients of.

A subset that leaves out the lower layers is cheaper twice over: their
weight gradients are never formed, and autograd stops below the lowest
selected layer, so the forward there keeps no graph either. The price is
that influence sees only the selected part of the gradient;
`cropi bench precision` measures what that costs in precision@10 %.
"""

from __future__ import annotations

import contextlib
import fnmatch
import re
from collections.abc import Iterator, Sequence

from torch import nn

from cropi.errors import InputError

_LAYER = re.compile(r"^(.*\.layers\.)(\d+)\.")
_HEAD_AND_NORM = ("lm_head.*", "*.norm.*", "norm.*")


def select_parameters(model: nn.Module, patterns: Sequence[str]) -> set[str]:
    """Names of the trainable parameters `patterns` select (globs, or 'last:L')."""
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    layers = sorted({int(m.group(2)) for m in map(_LAYER.match, names) if m})
    chosen: set[str] = set()
    for i, pattern in enumerate(patterns):
        if pattern.startswith("last:"):
            count = int(pattern[5:])
            if not layers:
                raise InputError(f"influence.params[{i}]: 'last:L' needs a model with numbered decoder layers")
            keep = set(layers[-count:])
            hits = {n for n in names if (m := _LAYER.match(n)) and int(m.group(2)) in keep}
            # The final norm and the output head sit above the last layer. A head tied to the
            # input embedding is the embedding itself, and taking it would run backward to the bottom.
            hits |= {n for n in names if not _LAYER.match(n) and any(fnmatch.fnmatchcase(n, h) for h in _HEAD_AND_NORM)}
        else:
            hits = {n for n in names if fnmatch.fnmatchcase(n, pattern)}
        if not hits:
            raise InputError(f"influence.params[{i}]: the pattern matches no trainable parameter of the model")
        chosen |= hits
    return chosen


@contextlib.contextmanager
def only_these_trainable(model: nn.Module, names: set[str] | None) -> Iterator[None]:
    """Freeze every trainable parameter outside `names` for the duration (None: change nothing)."""
    if names is None:
        yield
        return
    frozen = [p for n, p in model.named_parameters() if p.requires_grad and n not in names]
    for p in frozen:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(True)
