"""A job's results over the controller API, for `cropi fetch` (users never need the store's credentials).

    GET /v1/jobs/{name}/artifacts          what can be fetched: paths relative to the job's prefix, sizes
    GET /v1/jobs/{name}/artifacts/{path}   one of them, streamed (Content-Length, X-Cropi-Sha256)

What is listed, and nothing else, can be downloaded: the spec, the event archive, the report
(metrics.jsonl, summary.json, curves.png), each stage's selection and step records, the pool's
offline trajectories (what `cropi inspect` reads) and the final checkpoint (an HF folder). A
path is looked up under the job's own `jobs/<key>/` prefix only, after the tenant's job is found
(another tenant's job is as absent as one that never was), and must be a store key of one of
those kinds: no `..`, no other job's keys, no gradients or trainer state. A refused path is a 404
that does not repeat it.

The store reads an object whole (checking its SHA-256) and the answer streams it in 1 MiB
chunks: the controller holds one object at a time per download, a checkpoint shard included.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from fastapi import APIRouter, Depends, FastAPI, HTTPException
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from cropi.curriculum import layout
from cropi.curriculum.influence import POOL
from cropi.errors import InputError
from cropi.runtime.jobs import JobRegistry
from cropi.runtime.store import ObjectStore, sha256, validate_key
from cropi.spec import parse_spec_yaml

CHUNK_BYTES = 1 << 20
REPORT_FILES = ("metrics.jsonl", "summary.json", "curves.png")
SHA256_HEADER = "X-Cropi-Sha256"


class Artifact(BaseModel):
    path: str  # relative to the job's prefix, e.g. final/checkpoint/config.json
    size: int


class ArtifactList(BaseModel):
    name: str
    phase: str
    artifacts: list[Artifact]


def _singles(store: ObjectStore, key: str) -> set[str]:
    """The single keys fetch takes (present or not)."""
    stages = parse_spec_yaml(store.get(layout.spec_key(key)).decode(), "the stored spec").curriculum.stages
    return ({layout.spec_key(key), layout.events_key(key)} | {layout.report_key(key, n) for n in REPORT_FILES}
            | {layout.selection_key(key, s) for s in range(stages)}
            | {layout.stage_metrics_key(key, s) for s in range(stages)})


def _prefixes(key: str) -> tuple[str, ...]:
    """The folders fetch takes whole (each ends with '/')."""
    return layout.offline_prefix(key, POOL), layout.final_checkpoint_prefix(key) + "/"


def artifact_keys(store: ObjectStore, key: str) -> list[str]:
    """The store keys of job `key` that can be fetched, in a stable order."""
    found = {k for k in _singles(store, key) if store.exists(k)}
    for prefix in _prefixes(key):
        found.update(store.list(prefix))
    root = layout.job_prefix(key)
    return sorted(k for k in found if k.startswith(root))


def is_artifact(store: ObjectStore, key: str, full: str) -> bool:
    """Is store key `full` one that `artifact_keys` lists (without listing)?"""
    try:
        validate_key(full)
    except InputError:
        return False
    if not full.startswith(layout.job_prefix(key)):
        return False
    kind = full in _singles(store, key) or full.startswith(_prefixes(key))
    return kind and store.exists(full)


def artifacts_router(store: ObjectStore, jobs: JobRegistry, tenant: Callable[..., str],
                     key_or_404: Callable[[str, str], str]) -> APIRouter:
    """The routes; `tenant` is the app's dependency naming the tenant, `key_or_404(owner, name)` its lookup."""
    router = APIRouter()

    @router.get("/v1/jobs/{name}/artifacts", response_model=ArtifactList,
                responses={404: {"description": "no job of that name"}})
    def list_artifacts(name: str, owner: str = Depends(tenant)) -> ArtifactList:
        """What `cropi fetch` downloads of the job (what exists so far)."""
        key = key_or_404(owner, name)
        root = layout.job_prefix(key)
        return ArtifactList(name=name, phase=jobs.get(key)["phase"], artifacts=[
            Artifact(path=k[len(root):], size=store.size(k)) for k in artifact_keys(store, key)])

    @router.get("/v1/jobs/{name}/artifacts/{path:path}", response_class=StreamingResponse, responses={
        200: {"content": {"application/octet-stream": {}}, "description": "the object's bytes"},
        404: {"description": "no job of that name, or the path is not one of its listed artifacts"}})
    def get_artifact(name: str, path: str, owner: str = Depends(tenant)) -> StreamingResponse:
        key = key_or_404(owner, name)
        full = layout.job_prefix(key) + path
        if not is_artifact(store, key, full):
            raise HTTPException(404, f"job {name!r} has no artifact of that path "
                                     f"(GET /v1/jobs/{name}/artifacts lists them)")
        data = store.get(full)

        def chunks() -> Iterator[bytes]:
            for start in range(0, len(data), CHUNK_BYTES):
                yield data[start:start + CHUNK_BYTES]

        return StreamingResponse(chunks(), media_type="application/octet-stream",
                                 headers={"Content-Length": str(len(data)), SHA256_HEADER: sha256(data)})

    return router


def add_artifact_routes(app: FastAPI, store: ObjectStore, jobs: JobRegistry, tenant: Callable[..., str],
                        key_or_404: Callable[[str, str], str]) -> None:
    app.include_router(artifacts_router(store, jobs, tenant, key_or_404))
