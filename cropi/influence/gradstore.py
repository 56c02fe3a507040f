"""Projected gradients in the object store: one ``.npy`` part per key the
caller names, plus a ``.json`` sidecar beside it.

Stored as fp16 *unit* vectors with fp32 norms beside them. Scores are
cosines, which need only directions; a unit vector's components are at most
1, so fp16 cannot overflow (raw POPI gradients span orders of magnitude and
could), and its relative rounding (~5e-4) is far below the sketch's own error
(~1/sqrt(k) = 0.011 at k = 8192). It halves the bytes against fp32.

A part whose bytes do not read back (checksum, .npy or JSON parse errors,
shapes that disagree with each other or with the caller's prompts and
dimension) raises `CorruptPart` naming its key: callers treat it as missing.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence

import numpy as np

from cropi.influence.offline import CorruptPart
from cropi.influence.popi import ProjectedGradients
from cropi.runtime.store import ChecksumError, ObjectStore


def save_projected(store: ObjectStore, key: str, grads: ProjectedGradients, projector_info: dict) -> None:
    norms = grads.norms.astype(np.float32)
    safe = np.where(norms > 0, norms, 1.0)[:, None]
    unit = (grads.vectors / safe).astype(np.float16)
    buf = io.BytesIO()
    np.save(buf, unit, allow_pickle=False)
    meta = {
        "prompt_ids": grads.prompt_ids,
        "norms": norms.tolist(),
        "eligible": grads.eligible.astype(bool).tolist(),
        "dtype": "float16-unit",
        "projector": projector_info,
    }
    # The sidecar goes second: readers treat a part as present only when it exists.
    store.put(key, buf.getvalue())
    store.put(key[: -len(".npy")] + ".json", json.dumps(meta, sort_keys=True).encode())


def exists_projected(store: ObjectStore, key: str) -> bool:
    return store.exists(key) and store.exists(key[: -len(".npy")] + ".json")


def _get(store: ObjectStore, key: str, name: str) -> bytes:
    try:
        return store.get(name)
    except ChecksumError as err:
        raise CorruptPart(key, f"checksum mismatch of {name.rsplit('/', 1)[-1]}") from err


def load_projected(store: ObjectStore, key: str, prompt_ids: Sequence[str] | None = None,
                   dim: int | None = None) -> ProjectedGradients:
    """The part at `key`; `CorruptPart` if it does not read back whole (for the prompts `prompt_ids`,
    in that order, and projection dimension `dim`, when given). A missing part raises FileNotFoundError."""
    raw, meta_raw = _get(store, key, key), _get(store, key, key[: -len(".npy")] + ".json")
    try:
        unit = np.load(io.BytesIO(raw), allow_pickle=False)
    except (ValueError, EOFError, OSError) as err:
        raise CorruptPart(key, f"not a readable .npy array ({type(err).__name__})") from err
    try:
        meta = json.loads(meta_raw)
        ids, norms = list(meta["prompt_ids"]), np.asarray(meta["norms"], dtype=np.float32)
        eligible = np.asarray(meta["eligible"], dtype=bool)
    except (ValueError, TypeError, KeyError) as err:
        raise CorruptPart(key, f"its .json sidecar is unreadable ({type(err).__name__})") from err
    if (unit.dtype != np.float16 or (unit.ndim, norms.ndim, eligible.ndim) != (2, 1, 1)
            or not unit.shape[0] == len(ids) == norms.shape[0] == eligible.shape[0]):
        raise CorruptPart(key, "its array and its .json sidecar disagree in shape or type")
    if dim is not None and unit.shape[1] != dim:
        raise CorruptPart(key, f"holds vectors of dimension {unit.shape[1]}, not {dim}")
    if prompt_ids is not None and ids != list(prompt_ids):
        raise CorruptPart(key, f"holds {len(ids)} prompts, not those of its {len(prompt_ids)}")
    return ProjectedGradients(prompt_ids=ids, vectors=unit.astype(np.float32) * norms[:, None], norms=norms,
                              eligible=eligible)


def concat(parts: list[ProjectedGradients]) -> ProjectedGradients:
    return ProjectedGradients(
        prompt_ids=[i for p in parts for i in p.prompt_ids],
        vectors=np.concatenate([p.vectors for p in parts]) if parts else np.zeros((0, 0), np.float32),
        norms=np.concatenate([p.norms for p in parts]) if parts else np.zeros(0, np.float32),
        eligible=np.concatenate([p.eligible for p in parts]) if parts else np.zeros(0, bool),
    )
