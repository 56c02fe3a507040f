"""Projected gradients in the object store: one ``.npy`` part per key the
caller names, plus a ``.json`` sidecar beside it.

Stored as fp16 *unit* vectors with fp32 norms beside them. Scores are
cosines, which need only directions; a unit vector's components are at most
1, so fp16 cannot overflow (raw POPI gradients span orders of magnitude and
could), and its relative rounding (~5e-4) is far below the sketch's own error
(~1/sqrt(k) = 0.011 at k = 8192). It halves the bytes against fp32.
"""

from __future__ import annotations

import io
import json

import numpy as np

from cropi.influence.popi import ProjectedGradients
from cropi.runtime.store import ObjectStore


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


def load_projected(store: ObjectStore, key: str) -> ProjectedGradients:
    unit = np.load(io.BytesIO(store.get(key)), allow_pickle=False).astype(np.float32)
    meta = json.loads(store.get(key[: -len(".npy")] + ".json"))
    norms = np.asarray(meta["norms"], dtype=np.float32)
    return ProjectedGradients(
        prompt_ids=list(meta["prompt_ids"]),
        vectors=unit * norms[:, None],
        norms=norms,
        eligible=np.asarray(meta["eligible"], dtype=bool),
    )


def concat(parts: list[ProjectedGradients]) -> ProjectedGradients:
    return ProjectedGradients(
        prompt_ids=[i for p in parts for i in p.prompt_ids],
        vectors=np.concatenate([p.vectors for p in parts]) if parts else np.zeros((0, 0), np.float32),
        norms=np.concatenate([p.norms for p in parts]) if parts else np.zeros(0, np.float32),
        eligible=np.concatenate([p.eligible for p in parts]) if parts else np.zeros(0, bool),
    )
