"""The GRPO step under DeepSpeed ZeRO-3, data-parallel over the ranks of a
torch.distributed group (Ray Train workers; gloo on CPU, NCCL on GPU).

Every rank is handed the same full batch and trains on its contiguous shard.
The loss of each micro-batch is weighted by its share of the *global* token
count and multiplied by the world size, so that DeepSpeed's averaging of
gradients over ranks gives the single-process token-mean gradient of
`cropi.rl.trainer.TorchBackend`; clipping, AdamW and the warmup schedule are
the reference's too, and the loop is `GRPOTrainer.step` itself.

Checkpoints never assume a shared filesystem: each rank uploads its own
DeepSpeed files to the object store and downloads only what it needs. They
are read back with `torch.load(weights_only=True)` (`cropi.rl.zero_checkpoint`):
write access to the store never means running code in the trainer.
"""

from __future__ import annotations

import json
import math
import re
import tempfile
from pathlib import Path
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
from transformers import PreTrainedModel

from cropi.rl.trainer import GRPOTrainer, warmup_schedule
from cropi.rl.zero_checkpoint import UnsafeZeroCheckpoint, load_safely
from cropi.runtime.store import ObjectStore
from cropi.spec import RLSpec

# torch.optim.AdamW's defaults: the reference trainer uses them.
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
# DeepSpeed's default: parameters smaller than this stay whole on every rank (norms, biases).
PARAM_PERSISTENCE_THRESHOLD = 100_000

_TAG = "state"  # one DeepSpeed tag per store prefix: the prefix names the checkpoint
_MANIFEST = "manifest.json"  # written last: a prefix without it holds no complete checkpoint
_RANK_FILE = re.compile(r"zero_pp_rank_(\d+)_")  # DeepSpeed's per-rank files (partitions, optimizer shards)
# What a load downloads: the tag's own files, which are all DeepSpeed reads; its recovery scripts
# beside the tag (zero_to_fp32.py) stay in the store.
_STATE_FILE = re.compile(rf"{_TAG}/[A-Za-z0-9_][A-Za-z0-9_.-]*")


def deepspeed_config(
    rl: RLSpec,
    zero_stage: int,
    micro_batch: int,
    world_size: int,
    *,
    gpu: bool = False,
    dtype: torch.dtype = torch.float32,
    param_persistence_threshold: int = PARAM_PERSISTENCE_THRESHOLD,
) -> dict[str, Any]:
    """The DeepSpeed config of the policy engine.

    Gradient accumulation is caller-managed (`managed_gradient_accumulation:
    false`): a GRPO step runs as many micro-batches as its batch needs, then
    one `step()`. On CPU the optimizer is torch's own (`torch_adam`), which
    needs no compiled ops; bf16/fp16 only on GPU.
    """
    if rl.optimizer == "sgd":
        optimizer = {"type": "SGD", "params": {"lr": rl.lr, "momentum": rl.momentum,
                                               "weight_decay": rl.weight_decay}}
    else:
        optimizer = {"type": "AdamW", "params": {"lr": rl.lr, "betas": list(ADAM_BETAS), "eps": ADAM_EPS,
                                                 "weight_decay": rl.weight_decay, "torch_adam": not gpu}}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "train_batch_size": micro_batch * world_size,
        "managed_gradient_accumulation": False,
        "gradient_clipping": rl.max_grad_norm,
        "optimizer": optimizer,
        # SGD is not on ZeRO's list of tested optimizers; torch's SGD has no fused state to shard wrongly.
        "zero_allow_untested_optimizer": True,
        "zero_optimization": _zero_section(zero_stage, gpu, param_persistence_threshold),
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }
    config.update(_precision_section(gpu, dtype))
    return config


def reference_config(micro_batch: int, world_size: int, *, gpu: bool = False, dtype: torch.dtype = torch.float32,
                     param_persistence_threshold: int = PARAM_PERSISTENCE_THRESHOLD) -> dict[str, Any]:
    """The frozen reference model as a ZeRO-3 inference engine: sharded weights, no optimizer."""
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "train_batch_size": micro_batch * world_size,
        "zero_optimization": _zero_section(3, gpu, param_persistence_threshold),
        "steps_per_print": 2**62,
    }
    config.update(_precision_section(gpu, dtype))
    return config


def _zero_section(stage: int, gpu: bool, persistence: int) -> dict[str, Any]:
    section: dict[str, Any] = {"stage": stage, "contiguous_gradients": True,
                               # Overlap needs device streams; the CPU accelerator has none.
                               "overlap_comm": gpu}
    if stage == 3:
        section["stage3_param_persistence_threshold"] = persistence
    return section


def _precision_section(gpu: bool, dtype: torch.dtype) -> dict[str, Any]:
    if gpu and dtype == torch.bfloat16:
        return {"bf16": {"enabled": True}}
    if gpu and dtype == torch.float16:
        return {"fp16": {"enabled": True}}
    return {}


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rank `rank`'s contiguous share [lo, hi) of `n` items; the first `n % world_size` ranks get one more."""
    per, extra = divmod(n, world_size)
    lo = rank * per + min(rank, extra)
    return lo, lo + per + (1 if rank < extra else 0)


def micro_batches(n: int, rank: int, world_size: int, micro_batch: int) -> list[tuple[int, int]]:
    """The [lo, hi) ranges this rank runs, the same count on every rank.

    ZeRO-3 gathers each layer's weights collectively, so a rank with fewer
    sequences still takes part in every forward/backward: its missing passes
    are empty ranges (run on a stand-in row with zero weight).
    """
    lo, hi = shard_bounds(n, rank, world_size)
    count = max(1, math.ceil(math.ceil(n / world_size) / micro_batch))
    ranges = []
    for i in range(count):
        a = min(hi, lo + i * micro_batch)
        ranges.append((a, min(hi, a + micro_batch)))
    return ranges


class ZeroBackend:
    """The `GRPOTrainer` backend on DeepSpeed ZeRO: this rank's shard of every batch, DeepSpeed's optimizer."""

    def __init__(self, model: PreTrainedModel, ref_model: PreTrainedModel | None, rl: RLSpec, zero_stage: int = 3,
                 *, param_persistence_threshold: int = PARAM_PERSISTENCE_THRESHOLD):
        self.rl = rl
        gpu = torch.cuda.is_available()
        deepspeed.init_distributed(dist_backend="nccl" if gpu else "gloo")  # adopts an existing process group
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        dtype = next(model.parameters()).dtype
        if not gpu and dtype != torch.float32:
            # DeepSpeed's bf16/fp16 paths are GPU paths; CPU ranks train in fp32.
            dtype = torch.float32
            model = model.float()
            ref_model = ref_model.float() if ref_model is not None else None
        config = deepspeed_config(rl, zero_stage, rl.micro_batch, self.world_size, gpu=gpu, dtype=dtype,
                                  param_persistence_threshold=param_persistence_threshold)
        self.engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                                    config=config)
        load_safely(self.engine)  # checkpoints come from the store: never unpickle them
        self.module = self.engine  # forward through the engine: it gathers ZeRO-3 partitions
        self.device = self.engine.device
        self.reference = None
        if ref_model is not None:
            ref_model.eval().requires_grad_(False)
            if zero_stage == 3:
                ref_config = reference_config(rl.micro_batch, self.world_size, gpu=gpu, dtype=dtype,
                                              param_persistence_threshold=param_persistence_threshold)
                self.reference, _, _, _ = deepspeed.initialize(model=ref_model, config=ref_config)
            else:  # ZeRO-2 keeps whole weights on every rank; so does the frozen copy
                self.reference = ref_model.to(self.device)
        self._new_schedule()

    def _new_schedule(self) -> None:
        """The warmup schedule, stepped once per GRPO step (DeepSpeed would step it per optimizer step)."""
        optimizer = self.engine.basic_optimizer
        for group in optimizer.param_groups:
            group["lr"] = self.rl.lr
            group.pop("initial_lr", None)
        self.scheduler = warmup_schedule(optimizer, self.rl.warmup_steps)

    def passes(self, n: int, rows: int) -> list[tuple[int, int]]:
        return micro_batches(n, self.rank, self.world_size, rows)

    def zero_grad(self) -> None:
        pass  # the engine clears gradients in its step

    def backward(self, loss: torch.Tensor, weight: float) -> None:
        # x world size: DeepSpeed averages gradients over ranks, the reference sums micro-batches.
        self.engine.backward(loss * (weight * self.world_size), scale_wrt_gas=False)

    def optimizer_step(self) -> float:
        self.engine.step()  # clips to rl.max_grad_norm (the config's gradient_clipping)
        return float(self.engine.get_global_grad_norm())

    def reduce(self, sums: dict[str, float]) -> dict[str, float]:
        keys = sorted(sums)
        t = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return dict(zip(keys, t.tolist()))

    def reset_optimizer(self) -> None:
        """Forget moments and restart the warmup, as the torch backend does."""
        self.engine.basic_optimizer.state.clear()
        self._new_schedule()


class ZeroGRPOTrainer(GRPOTrainer):
    """`GRPOTrainer` on a `ZeroBackend`: call `step` on every rank with the same full batch."""

    def __init__(self, model: PreTrainedModel, ref_model: PreTrainedModel | None, pad_id: int, rl: RLSpec,
                 temperature: float = 1.0, zero_stage: int = 3, *,
                 param_persistence_threshold: int = PARAM_PERSISTENCE_THRESHOLD):
        backend = ZeroBackend(model, ref_model, rl, zero_stage, param_persistence_threshold=param_persistence_threshold)
        super().__init__(backend.engine.module, None, pad_id, rl, temperature, backend=backend)
        self.engine, self.rank, self.world_size = backend.engine, backend.rank, backend.world_size

    # ----------------------------------------------------------- checkpoints
    def save_state(self, store: ObjectStore, prefix: str) -> None:
        """Weights, optimizer and schedule of every rank under `prefix` (collective).

        Each rank uploads the DeepSpeed files it wrote (a file that several
        ranks wrote goes up once); rank 0 writes the manifest last, so a save
        that dies halfway leaves no loadable checkpoint behind.
        """
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / _TAG).mkdir()
            self.engine.save_checkpoint(tmp, tag=_TAG, client_state={"scheduler": self.scheduler.state_dict()},
                                        save_latest=False)
            mine = sorted(p.relative_to(tmp).as_posix() for p in Path(tmp).rglob("*") if p.is_file())
            written: list[list[str]] = [[] for _ in range(self.world_size)]
            dist.all_gather_object(written, mine)
            earlier = {f for r in range(self.rank) for f in written[r]}
            for name in mine:
                if name not in earlier:
                    store.put(f"{prefix}/{name}", (Path(tmp) / name).read_bytes())
        dist.barrier()
        if self.rank == 0:
            files = sorted({f for files in written for f in files})
            store.put(f"{prefix}/{_MANIFEST}", json.dumps({"world_size": self.world_size, "files": files}).encode())
        dist.barrier()

    def load_state(self, store: ObjectStore, prefix: str) -> None:
        """Restore what `save_state` stored under `prefix` (collective; same world size)."""
        manifest = json.loads(store.get(f"{prefix}/{_MANIFEST}"))
        if manifest["world_size"] != self.world_size:
            raise ValueError(f"checkpoint {prefix} was saved by {manifest['world_size']} ranks, this trainer has "
                             f"{self.world_size}: ZeRO shards cannot be re-partitioned")
        checkpoint_engine = load_safely(self.engine)
        with tempfile.TemporaryDirectory() as tmp:
            for name in manifest["files"]:
                if not _STATE_FILE.fullmatch(name):
                    continue  # not read by DeepSpeed
                other = _RANK_FILE.search(Path(name).name)
                if other and int(other.group(1)) != self.rank:
                    continue  # another rank's shard
                path = Path(tmp) / name
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(store.get(f"{prefix}/{name}"))
                checkpoint_engine.keys[str(path)] = f"{prefix}/{name}"
            try:
                _, client_state = self.engine.load_checkpoint(tmp, tag=_TAG, load_optimizer_states=True,
                                                              load_lr_scheduler_states=False)
            finally:
                checkpoint_engine.keys.clear()
        if client_state is None:
            raise FileNotFoundError(f"DeepSpeed found no checkpoint in {prefix}")
        scheduler = client_state.get("scheduler")
        # `load_state_dict` sets every key as an attribute of the scheduler: only its own state's keys.
        if not isinstance(scheduler, dict) or not scheduler.keys() <= self.scheduler.state_dict().keys():
            raise UnsafeZeroCheckpoint(f"ZeRO checkpoint {prefix!r} holds a schedule state cropi did not write")
        self.scheduler.load_state_dict(scheduler)
