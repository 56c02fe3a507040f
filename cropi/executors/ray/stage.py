"""One curriculum stage on Ray Train: ZeRO-3 ranks train, the rollout service samples.

Every rank runs the same stage loop as the inline trainer (`run_train_task`,
`train_stage`) over a `RayPolicy`:

    rank 0   samples each step's rollouts on the rollout service (at the
             weights of the previous step), hands them to every rank, keeps
             the journal (progress, metrics, step accounting) and evaluates
    all      take the ZeRO-3 GRPO step on their shard of the batch, publish
             the new weights to the rollout replicas, save their checkpoint
             shards to the store

Batches, seeds and the stage logic are those of the inline executor, so the
two differ only by the floating-point order of a sharded update.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from cropi.curriculum import layout
from cropi.curriculum.sampling import Draw, evaluate_policy, sample_step, sample_texts
from cropi.curriculum.selection import stored_selection
from cropi.curriculum.stage import TrainerJournal, run_train_task
from cropi.curriculum.state import Progress
from cropi.data.sources import JobData
from cropi.executors.inline import JobCache, job_warning
from cropi.executors.report import StageReport
from cropi.runtime.jobs import JobRegistry
from cropi.runtime.tasks import TaskContext, TrainTask
from cropi.spec import JobSpec


def export_hf(trainer: Any, store: Any, prefix: str, tokenizer: Any) -> None:
    """The ZeRO trainer's weights as a consolidated HF folder under `prefix` (tokenizer too if given),
    laid out as the inline stage checkpoints. Collective; rank 0 writes; returns once it is stored."""
    from cropi.executors.ray.weight_sync import publish_weights

    publish_weights(trainer.engine, store, prefix, tokenizer)
    dist.barrier()


def _broadcast(obj: Any, rank: int) -> Any:
    box = [obj if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class WeightPublisher:
    """After each step, the trainer's weights go to every rollout replica (all ranks call `publish`)."""

    def __init__(self, spec: JobSpec, trainer: Any, store: Any, app_name: str, receivers: int, rank: int):
        from cropi.executors.ray.weight_channel import get_or_create_board, node_address

        self.spec, self.trainer, self.store, self.rank = spec, trainer, store, rank
        self.board = get_or_create_board(app_name) if rank == 0 else None
        self.group = None
        if spec.ray.weight_sync == "broadcast" and rank == 0:
            from cropi.executors.ray.weight_sync import SyncGroup
            from cropi.runtime.redis_server import free_port

            host, port = node_address(), free_port()
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            self.board.announce.remote({"path": "broadcast", "host": host, "port": port, "backend": backend,
                                        "owner": spec.name})
            self.group = SyncGroup.create_sender(host, port, receivers=receivers, backend=backend)

    def publish(self, version: int) -> None:
        if self.spec.ray.weight_sync == "broadcast":
            from cropi.executors.ray.weight_sync import send_weights

            send_weights(self.trainer.model, self.group, version, self.spec.ray.sync_bucket_mb << 20)
            return
        prefix = layout.published_weights_prefix(self.spec.name)
        export_hf(self.trainer, self.store, prefix, None)  # replicas read the weights only
        if self.rank == 0:
            import ray

            ray.get(self.board.announce.remote({"path": "store", "store_url": self.store.url, "prefix": prefix,
                                                "version": version, "owner": self.spec.name}))

    def close(self) -> None:
        if self.group is not None:
            self.group.close()


class RayPolicy:
    """The `Policy` interface of the stage loop, over ZeRO-3 ranks and the rollout service."""

    def __init__(self, spec: JobSpec, trainer: Any, engine: Any, publisher: WeightPublisher, rank: int):
        self.spec, self.trainer, self.engine, self.publisher, self.rank = spec, trainer, engine, publisher, rank
        self.version = 0  # the trainer step whose weights the rollout replicas must hold

    def sync(self, version: int) -> None:
        self.publisher.publish(version)
        self.version = version

    def evaluate(self, data: JobData, step: int, log: Callable[..., None]) -> dict[str, dict[str, float]]:
        results = evaluate_policy(self.spec, self.engine, data, step, log) if self.rank == 0 else None
        return _broadcast(results, self.rank)  # every rank sees the same progress (early stopping)

    def train_step(self, step: int, draw: Draw) -> dict[str, float]:
        t0 = time.perf_counter()
        batch = sample_step(self.spec, self.engine, step, draw) if self.rank == 0 else None
        groups, rewards, draws = _broadcast(batch, self.rank)
        t1 = time.perf_counter()
        stats = self.trainer.step(groups, rewards)
        t2 = time.perf_counter()
        self.sync(step)
        stats.update(rollout_s=t1 - t0, train_s=t2 - t1, sync_s=time.perf_counter() - t2, draws=draws,
                     samples=sample_texts(groups, rewards))
        return stats

    def reset_optimizer(self) -> None:
        self.trainer.reset_optimizer()


def stage_worker(config: dict) -> dict | None:
    """The per-rank loop (runs inside a Ray Train worker); rank 0 returns the task's result."""
    import ray.train
    from ray import serve

    from cropi.executors.ray.rollout_serve import ServeRolloutEngine
    from cropi.models.loading import load_policy
    from cropi.rl.zero3 import ZeroGRPOTrainer
    from cropi.runtime.config import open_store, redis_client

    rank = ray.train.get_context().get_world_rank()
    store = open_store(config["store_url"])
    cache = JobCache(store)
    job, stage = config["job"], config["stage"]
    spec, data = cache.spec(job), cache.data(job)
    jobs = JobRegistry(redis_client(config["redis_url"]))

    torch.manual_seed(spec.seed)
    model, tokenizer = load_policy(spec.model.path, spec.model.dtype)
    ref = None
    if spec.rl.kl_coef > 0:
        ref, _ = load_policy(spec.model.path, spec.model.dtype)
    trainer = ZeroGRPOTrainer(model, ref, tokenizer.pad_token_id, spec.rl, spec.rollout.temperature,
                              zero_stage=spec.ray.zero_stage)
    # Only rank 0 keeps the journal; every rank reads the stored state (nobody writes it before
    # the first save below) and follows the same progress.
    journal = TrainerJournal(store, jobs, job, heartbeat=lambda: None, keeper=rank == 0)
    journal.on_stage_end = StageReport(store, spec, list(data.validation), job_warning(jobs, job))
    state = journal.load()
    if state is not None:
        trainer.load_state(store, state["zero"])

    engine = None
    if rank == 0:
        handle = serve.get_app_handle(config["app_name"])
        engine = ServeRolloutEngine(handle, min_version_fn=lambda: policy.version, owner=job)
    publisher = WeightPublisher(spec, trainer, store, config["app_name"], config["receivers"], rank)
    policy = RayPolicy(spec, trainer, engine, publisher, rank)
    try:
        policy.sync(journal.progress.step if journal.progress else 0)

        def save(progress: Progress) -> None:
            slot = layout.zero_slot(job, progress.step)
            trainer.save_state(store, slot)
            dist.barrier()  # every rank's shard is stored before the state points at the slot
            journal.commit(progress, {"zero": slot, "executor": "ray"})

        result = run_train_task(policy, data, journal, stage, save,
                                put_checkpoint=lambda prefix: export_hf(trainer, store, prefix, tokenizer))
    finally:
        publisher.close()
    return result if rank == 0 else None


def train_stage_on_ray(cache: JobCache, ctx: TaskContext, task: TrainTask, redis_url: str, app_name: str,
                       receivers: int) -> dict:
    """Driver side of a `train` task: one Ray Train run of `stage_worker` on the job's trainer workers."""
    from cropi.executors.ray.train_run import run_on_ray_train

    job, stage = task.job, task.stage
    spec, store = cache.spec(job), cache.store
    journal = TrainerJournal(store, ctx.jobs, job, heartbeat=lambda: None)  # read here; the ranks keep it
    journal.load()
    selection = stored_selection(store, spec, stage)
    progress = journal.progress or Progress()
    if progress.stage == stage and selection is not None:
        ctx.observer.stage_started(stage, progress, selection)  # e.g. the embedded run's display
    config = {"store_url": store.url, "redis_url": redis_url, "job": job, "stage": stage, "app_name": app_name,
              "receivers": receivers}
    result = run_on_ray_train(stage_worker, config, workers=spec.ray.trainer_workers, gpus=spec.ray.trainer_gpus)
    journal.load()  # the stage's records, as the ranks stored them
    for record in journal.records.get(str(stage), []):
        ctx.observer.metric(record)
    return result
