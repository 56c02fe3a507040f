"""Batches of training prompts: seeded epoch-wise shuffles of a prompt set."""

from __future__ import annotations

import random
from collections.abc import Sequence

from cropi.data.arith import stream_seed
from cropi.data.types import Prompt


class EpochSampler:
    """Yields `batch_size` prompts at a time, reshuffling at every epoch.

    The order is a pure function of (seed, epoch), so a resumed run that
    skips the first `k` batches sees the same batches as an uninterrupted one.
    """

    def __init__(self, prompts: Sequence[Prompt], batch_size: int, seed: int | str):
        if not prompts:
            raise ValueError("cannot sample batches from an empty prompt set")
        self.prompts = list(prompts)
        self.batch_size = batch_size
        self.seed = seed

    def batch(self, index: int) -> list[Prompt]:
        """The `index`-th batch (0-based) of the infinite shuffled stream."""
        n = len(self.prompts)
        out: list[Prompt] = []
        pos = index * self.batch_size
        while len(out) < self.batch_size:
            epoch, offset = divmod(pos, n)
            order = list(range(n))
            random.Random(stream_seed("epoch", self.seed, epoch)).shuffle(order)
            take = min(self.batch_size - len(out), n - offset)
            out.extend(self.prompts[i] for i in order[offset : offset + take])
            pos += take
        return out
