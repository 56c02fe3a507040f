"""Offline trajectories: responses of the behaviour policy (the base model),
sampled once and reused by every later influence estimate.

Stored as Parquet parts, one row per prompt with its whole group, under the
keys the caller names (`curriculum/layout.py`: one folder per set). Each part's sampling seed depends
only on (job seed, set, part index), so parts can be produced in any order,
by any worker, and a part already in the store is never redone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cropi.seeding import stream_seed
from cropi.data.types import Prompt
from cropi.data.rewards import reward
from cropi.rollout.base import RolloutEngine, SamplingParams
from cropi.runtime.store import ObjectStore

SCHEMA = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("prompt_ids", pa.list_(pa.int32())),
        ("response_ids", pa.list_(pa.list_(pa.int32()))),
        ("logprobs", pa.list_(pa.list_(pa.float32()))),
        ("rewards", pa.list_(pa.float32())),
        ("temperature", pa.float32()),
        ("texts", pa.list_(pa.string())),  # the decoded responses, for people reading them
    ]
)


@dataclass
class OfflineGroup:
    """One prompt's offline responses with behaviour log-probs and rewards."""

    prompt_id: str
    prompt_ids: list[int]
    response_ids: list[list[int]]
    logprobs: list[list[float]]
    rewards: list[float]
    temperature: float
    texts: list[str] = field(default_factory=list)  # decoded responses (empty in parts stored before they were)

    @property
    def pass_rate(self) -> float:
        return float(np.mean(self.rewards))

    @property
    def eligible(self) -> bool:
        """All-equal rewards give zero advantages and no gradient (docs/design.md §2.2)."""
        return len(set(self.rewards)) > 1


def _encode(groups: list[OfflineGroup]) -> bytes:
    table = pa.table(
        {
            "prompt_id": [g.prompt_id for g in groups],
            "prompt_ids": [g.prompt_ids for g in groups],
            "response_ids": [g.response_ids for g in groups],
            "logprobs": [g.logprobs for g in groups],
            "rewards": [g.rewards for g in groups],
            "temperature": [g.temperature for g in groups],
            "texts": [g.texts for g in groups],
        },
        schema=SCHEMA,
    )
    sink = pa.BufferOutputStream()  # Arrow's own stream, for the reason _decode gives
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()


def _decode(data: bytes) -> list[OfflineGroup]:
    # No thread pool and no Python file object: pyarrow's pool can abort a short-lived process at
    # exit ("terminate called without an active exception", apache/arrow#34314, #50482). `cropi
    # inspect` hit it 18 runs in 40 as it was, 3 in 40 with an Arrow buffer alone, 0 in 40 like this.
    rows = pq.read_table(pa.BufferReader(data), use_threads=False).to_pylist()
    return [OfflineGroup(**{k: v for k, v in row.items() if v is not None}) for row in rows]


def collect_offline_part(
    engine: RolloutEngine,
    store: ObjectStore,
    key: str,
    set_name: str,
    chunk: Sequence[Prompt],
    index: int,
    n: int,
    temperature: float,
    max_new_tokens: int,
    seed: int,
) -> bool:
    """Sample and store part `index` of set `set_name` (the prompts `chunk`) at `key` unless stored;
    True if it was written. The sampling seed depends on (seed, set name, index) only."""
    if store.exists(key):
        return False
    sampling = SamplingParams(
        temperature=temperature, max_new_tokens=max_new_tokens,
        seed=stream_seed("offline", seed, set_name, index) % 2**63,
    )
    responses = engine.generate([p.text for p in chunk], n, sampling)
    groups = [
        OfflineGroup(
            prompt_id=p.id,
            prompt_ids=group[0].prompt_ids,
            response_ids=[t.response_ids for t in group],
            logprobs=[t.logprobs for t in group],
            rewards=[reward(p, t.text) for t in group],
            temperature=temperature,
            texts=[t.text for t in group],
        )
        for p, group in zip(chunk, responses)
    ]
    store.put(key, _encode(groups))
    return True


def collect_offline(
    engine: RolloutEngine,
    store: ObjectStore,
    part_key: Callable[[int], str],
    set_name: str,
    prompts: Sequence[Prompt],
    n: int,
    temperature: float,
    max_new_tokens: int,
    seed: int,
    part_size: int = 256,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Sample and store every missing part (part i at `part_key(i)`); returns how many were written."""
    written = 0
    for index, start in enumerate(range(0, len(prompts), part_size)):
        chunk = prompts[start : start + part_size]
        written += collect_offline_part(engine, store, part_key(index), set_name, chunk, index, n, temperature,
                                        max_new_tokens, seed)
        if progress is not None:
            progress(len(chunk))
    return written


def load_offline(store: ObjectStore, prefix: str) -> list[OfflineGroup]:
    """Every part stored under `prefix` (one set's folder), in part order."""
    keys = store.list(prefix)
    return [g for key in keys for g in _decode(store.get(key))]
