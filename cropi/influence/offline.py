"""Offline trajectories: responses of the behaviour policy (the base model),
sampled once and reused by every later influence estimate.

Stored as Parquet parts, one row per prompt with its whole group, under the
keys the caller names (`curriculum/layout.py`: one folder per set). Each part's sampling seed depends
only on (job seed, set, part index), so parts can be produced in any order,
by any worker, and a part already in the store is never redone.

A stored part that cannot be read back as what it should be (its checksum, a
Parquet parse error, the wrong prompts or group sizes) counts as missing:
`read_offline_part` raises `CorruptPart` naming its key, and
`collect_offline_part` samples it again (same seed, same groups).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cropi.seeding import stream_seed
from cropi.data.types import Prompt
from cropi.data.rewards import reward
from cropi.rollout.base import RolloutEngine, SamplingParams
from cropi.runtime.store import ChecksumError, ObjectStore

log = logging.getLogger(__name__)

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


class CorruptPart(ValueError):
    """A stored part (offline trajectories, projected gradients) is there but unreadable or not what
    it should be. The message names the key and the kind of fault, never the data."""

    def __init__(self, key: str, why: str):
        super().__init__(f"stored part {key!r} is unreadable: {why}")
        self.key, self.why = key, why


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
    replace: bool = False,
) -> bool:
    """Sample and store part `index` of set `set_name` (the prompts `chunk`) at `key` unless stored
    and readable (`replace`: the caller found it is not); True if it was written. The sampling
    seed depends on (seed, set name, index) only."""
    if not replace and store.exists(key):
        try:
            read_offline_part(store, key, [p.id for p in chunk], n)
            return False
        except FileNotFoundError:
            pass
        except CorruptPart as bad:
            log.warning("%s; sampling it again", bad)
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


def read_offline_part(store: ObjectStore, key: str, prompt_ids: Sequence[str] | None = None,
                      n: int | None = None) -> list[OfflineGroup]:
    """The groups of the part at `key`; `CorruptPart` if its bytes do not read back as a part (of the
    prompts `prompt_ids`, in that order, with `n` responses each, when given). A missing part raises
    FileNotFoundError; any other store error (the store unreachable) propagates as it is."""
    try:
        data = store.get(key)
    except ChecksumError as err:
        raise CorruptPart(key, "checksum mismatch") from err
    try:
        groups = _decode(data)
    except (ValueError, TypeError, KeyError, OSError, pa.ArrowException) as err:
        raise CorruptPart(key, f"not a readable Parquet part ({type(err).__name__})") from err
    if prompt_ids is not None and [g.prompt_id for g in groups] != list(prompt_ids):
        raise CorruptPart(key, f"holds {len(groups)} groups, not those of its {len(prompt_ids)} prompts")
    for g in groups:
        sizes = {len(g.response_ids), len(g.logprobs), len(g.rewards)} | ({len(g.texts)} if g.texts else set())
        if len(sizes) != 1 or (n is not None and sizes != {n}):
            raise CorruptPart(key, "a group's responses, log-probs and rewards disagree in number")
        if any(len(r) != len(lp) for r, lp in zip(g.response_ids, g.logprobs)):
            raise CorruptPart(key, "a response's tokens and log-probs disagree in number")
    return groups


def load_offline(store: ObjectStore, prefix: str) -> list[OfflineGroup]:
    """Every part stored under `prefix` (one set's folder), in part order (`CorruptPart` on a bad one)."""
    keys = store.list(prefix)
    return [g for key in keys for g in read_offline_part(store, key)]
