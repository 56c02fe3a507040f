"""The gradient-projection pool on a real local Ray: it stores the inline
projector's bytes for every part of a stage, survives an actor killed while
it projects, feeds the task bus's `project` tasks to its actors, and its
benchmark runs."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest

from cropi.curriculum.layout import spec_key
from cropi.executors.inline import InlineExecutor, JobCache
from cropi.data.rewards import register_verifier
from cropi.data.sources import load_job_data
from cropi.curriculum.influence import InfluenceEngine
from cropi.runtime.store import LocalStore
from cropi.runtime.tasks import ProjectTask, TaskContext, TaskKind, project_task_id
from cropi.spec import parse_spec

from .conftest import TEST_MODEL, stand_in_verifier

pytest.importorskip("ray", reason="the projection pool needs the `ray` extra")

JOB = "pooljob"
SPEC = {
    "name": JOB,
    "model": {"path": TEST_MODEL},
    "data": {
        # 600 pool prompts: three pool parts of the projector's 256-prompt parts, plus one validation part.
        "pool": {"source": "builtin:arith?digits=1", "size": 600},
        "validation": [{"name": "add1", "source": "builtin:arith?skills=add&digits=1", "size": 12}],
    },
    "rollout": {"max_new_tokens": 4},
    "offline": {"n_pool": 4, "n_valid": 4, "temperature": 1.0},
    "influence": {"proj_dim": 256, "max_valid_prompts": 8},
    # What a projector service does with the job's tasks (the pool tests drive a pool directly).
    "executor": "ray",
    "ray": {"projector_actors": 2},
}
GRADS = f"jobs/{JOB}/stages/0/grads/"


@pytest.fixture(scope="module")
def offline_store(tmp_path_factory, tiny_model) -> Path:
    """A store folder with the job's spec and offline trajectories, nothing projected yet."""
    from cropi.rollout.hf import HFRolloutEngine

    root = tmp_path_factory.mktemp("offline")
    store = LocalStore(root)
    spec = parse_spec(SPEC)
    store.put(spec_key(JOB), spec.to_yaml().encode())
    model, tok = tiny_model
    with register_verifier("int", stand_in_verifier):  # mixed rewards: parts hold real gradients
        InfluenceEngine(spec, store).collect_offline(HFRolloutEngine(model, tok), load_job_data(spec))
    return root


@pytest.fixture(scope="module")
def stage_parts(offline_store) -> list[tuple[str, int]]:
    engine = InfluenceEngine(parse_spec(SPEC), LocalStore(offline_store))
    engine.load_offline(load_job_data(engine.spec))
    return engine.stage_parts(0)


@pytest.fixture(scope="module")
def inline_grads(offline_store, stage_parts, tmp_path_factory) -> dict[str, bytes]:
    """Every stored object of stage 0's projection, as the inline projector writes it."""
    import torch

    root = tmp_path_factory.mktemp("inline")
    shutil.copytree(offline_store, root, dirs_exist_ok=True)
    inline = InlineExecutor(JobCache(LocalStore(root)))
    threads = torch.get_num_threads()
    # One thread, as in the pool's actors: the same computation (and no threads spinning on busy cores).
    torch.set_num_threads(1)
    try:
        for set_name, part in stage_parts:
            inline.project(ProjectTask(JOB, 0, set_name, part), TaskContext(jobs=None))
    finally:
        torch.set_num_threads(threads)
    return _objects(root)


def _objects(root: Path) -> dict[str, bytes]:
    store = LocalStore(root)
    return {key: store.get(key) for key in store.list(GRADS)}


@pytest.fixture(scope="module")
def pool_store(offline_store, tmp_path_factory) -> LocalStore:
    root = tmp_path_factory.mktemp("pool") / "store"
    shutil.copytree(offline_store, root)
    return LocalStore(root)


@pytest.fixture(scope="module")
def warm_pool(ray_local, pool_store):
    """One 2-actor pool for the module: actors start and load the stage once (seconds each on 2 cores)."""
    from cropi.executors.ray.projection_pool import ProjectionPool

    with ProjectionPool(pool_store.url, actors=2) as pool:
        yield pool


@pytest.fixture
def pool(warm_pool, pool_store):
    """The warm pool over a store where nothing is projected yet."""
    shutil.rmtree(pool_store.root / GRADS, ignore_errors=True)
    return warm_pool


def test_the_pool_stores_the_inline_projectors_bytes_for_every_part(pool, pool_store, stage_parts, inline_grads):
    done: dict[tuple[str, int], dict] = {}
    summary = pool.project_parts(JOB, 0, stage_parts, on_done=lambda part, result: done.update({part: result}))

    assert len(stage_parts) == 4 and len(inline_grads) == 2 * len(stage_parts)  # .npy + .json per part
    assert _objects(pool_store.root) == inline_grads
    assert sorted(done) == sorted(stage_parts)
    assert len({r["actor"] for r in done.values()}) == 2  # fanned out: both actors worked
    assert summary["parts"] == len(stage_parts) and summary["retried"] == 0


def test_an_actor_killed_while_projecting_is_replaced_and_its_part_redone(ray_local, pool, pool_store, stage_parts,
                                                                          inline_grads):
    killed = []
    replaced_before = pool.replaced

    def kill_the_busy_actor(part, result):
        # The first part is done; the other actor is still busy with its own (or, finished
        # already, is handed the next one): either way it dies holding a part.
        if not killed:
            busy = next(a for a in pool.actors if a._actor_id.hex() != result["actor"])
            ray_local.kill(busy, no_restart=True)
            killed.append(busy)

    summary = pool.project_parts(JOB, 0, stage_parts, on_done=kill_the_busy_actor)

    assert _objects(pool_store.root) == inline_grads
    assert summary["retried"] == 1 and pool.replaced == replaced_before + 1
    assert killed[0] not in pool.actors and len(pool.actors) == 2
    ray_local.get([a.__ray_ready__.remote() for a in pool.actors], timeout=60)  # the replacement is alive


def test_a_projector_service_runs_a_ray_jobs_tasks_on_the_pool(ray_local, redis_server, pool_store, stage_parts,
                                                               inline_grads):
    from cropi.executors import JobExecutors
    from cropi.runtime.jobs import JobRegistry
    from cropi.runtime.queue import TaskBus
    from cropi.runtime.worker import Worker

    client = redis_server.client()
    bus = TaskBus(client, visibility_timeout_s=5)
    ids = [project_task_id(JOB, 0, s, i) for s, i in stage_parts]
    for task_id, (set_name, part) in zip(ids, stage_parts):
        bus.submit(TaskKind.PROJECT, task_id, {"job": JOB, "stage": 0, "set": set_name, "part": part})

    # `cropi serve projector --parallel 2`: two tasks claimed at once, run on the job's pool.
    executors = JobExecutors(pool_store)
    service = Worker([TaskKind.PROJECT], bus, JobRegistry(client), executors, "pool-projector", parallel=2)
    stop = threading.Event()
    runner = threading.Thread(target=service.run, args=(stop,))
    runner.start()
    try:
        results = bus.wait(ids, timeout_s=180)
    finally:
        stop.set()
        runner.join()
        executors.close()

    assert [(r["set"], r["part"]) for r in map(results.get, ids)] == stage_parts
    assert _objects(pool_store.root) == inline_grads
    assert bus.depth(TaskKind.PROJECT) == {"waiting": 0, "pending": 0}


def test_a_part_whose_actors_keep_dying_is_reported_by_name(ray_local, tmp_path):
    from cropi.executors.ray.projection_pool import PoolError, ProjectionPool

    # A store that cannot be opened kills every actor at start-up (a deterministic stand-in
    # for a part that crashes its actor each time).
    with ProjectionPool(f"s3://no-endpoint-{tmp_path.name}", actors=1, max_attempts=2) as pool:
        with pytest.raises(PoolError, match=r"part pool/3 of job j stage 0: 2 actors died"):
            pool.project_parts("j", 0, [("pool", 3)])
        assert pool.replaced == 2


def test_the_pool_bench_reports_both_pool_sizes_in_a_quick_run(ray_local, tiny_model, tmp_path):
    from cropi.bench.pool import run_pool_bench

    report = run_pool_bench(tmp_path, actors=2, model=TEST_MODEL, pool_size=257, n_pool=2, max_new_tokens=4,
                            proj_dim=256)

    assert json.loads((tmp_path / "pool.json").read_text()) == report
    assert sorted(report["runs"]) == ["actors_1", "actors_2"]
    assert report["parts"] == 2 and all(r["retried"] == 0 for r in report["runs"].values())
    assert all(r["startup_s"] > 0 and r["parts_per_s"] > 0 for r in report["runs"].values())
    assert report["speedup"] > 0 and report["goal_speedup"] == pytest.approx(1.7)
