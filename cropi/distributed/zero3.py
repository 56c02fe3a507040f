"""The GRPO step under DeepSpeed ZeRO-3, data-parallel over the ranks of a
torch.distributed group (Ray Train workers; gloo on CPU, NCCL on GPU).

Every rank is handed the same full batch and trains on its contiguous shard.
The loss of each micro-batch is weighted by its share of the *global* token
count and multiplied by the world size, so that DeepSpeed's averaging of
gradients over ranks gives the single-process token-mean gradient of
`cropi.rl.trainer.GRPOTrainer`; clipping, AdamW and the warmup schedule are
the reference's too. The two trainers then differ only by the order of
floating-point sums.

Checkpoints never assume a shared filesystem: each rank uploads its own
DeepSpeed files to the object store and downloads only what it needs.
"""

from __future__ import annotations

import json
import math
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from cropi.distributed.weight_sync import publish_weights
from cropi.rl.batch import (
    TokenBatch,
    collate,
    response_logits,
    token_entropy,
    token_logprobs,
)
from cropi.rl.grpo import group_advantages, grpo_loss
from cropi.rl.trainer import batch_stats
from cropi.rollout.base import Trajectory
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


def _pass_batch(batch: TokenBatch, lo: int, hi: int) -> TokenBatch:
    """The sequences of one pass; an empty range borrows row 0 (its loss is weighted by 0)."""
    if hi <= lo:
        lo, hi = 0, 1
    return TokenBatch(**{k: (v[lo:hi] if isinstance(v, torch.Tensor) else v) for k, v in batch.__dict__.items()})


class ZeroGRPOTrainer:
    """`GRPOTrainer` on DeepSpeed ZeRO: call `step` on every rank with the same full batch."""

    def __init__(
        self,
        model: PreTrainedModel,
        ref_model: PreTrainedModel | None,
        pad_id: int,
        rl: RLSpec,
        temperature: float = 1.0,
        zero_stage: int = 3,
        *,
        param_persistence_threshold: int = PARAM_PERSISTENCE_THRESHOLD,
    ):
        self.rl, self.pad_id, self.temperature = rl, pad_id, temperature
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
        self.model = self.engine.module  # ZeRO-3: parameters are partitioned; see `full_state_dict`
        self.device = self.engine.device
        self.ref = None
        if ref_model is not None:
            ref_model.eval().requires_grad_(False)
            if zero_stage == 3:
                ref_config = reference_config(rl.micro_batch, self.world_size, gpu=gpu, dtype=dtype,
                                              param_persistence_threshold=param_persistence_threshold)
                self.ref, _, _, _ = deepspeed.initialize(model=ref_model, config=ref_config)
            else:  # ZeRO-2 keeps whole weights on every rank; so does the frozen copy
                self.ref = ref_model.to(self.device)
        self._new_schedule()

    # ----------------------------------------------------------- optimizer
    def _new_schedule(self) -> None:
        """The reference's warmup schedule, stepped once per GRPO step (DeepSpeed would step it per optimizer step)."""
        optimizer = self.engine.basic_optimizer
        for group in optimizer.param_groups:
            group["lr"] = self.rl.lr
            group.pop("initial_lr", None)
        warmup = self.rl.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0
        )

    def reset_optimizer(self) -> None:
        """Forget moments and restart the warmup, as `GRPOTrainer.reset_optimizer` does."""
        self.engine.basic_optimizer.state.clear()
        self._new_schedule()

    # ----------------------------------------------------------- the step
    @torch.no_grad()
    def _ref_logprobs(self, batch: TokenBatch, passes: Sequence[tuple[int, int]]) -> list[torch.Tensor | None]:
        if self.ref is None or self.rl.kl_coef == 0:
            return [None] * len(passes)
        self.ref.eval()
        out = []
        for lo, hi in passes:
            mb = _pass_batch(batch, lo, hi)
            out.append(token_logprobs(response_logits(self.ref, mb, self.temperature), mb.response_ids))
        return out

    def step(self, groups: Sequence[Sequence[Trajectory]], rewards: Sequence[Sequence[float]]) -> dict[str, float]:
        """One GRPO update on the full batch (every rank passes the same one); stats are batch values."""
        reward_t = torch.tensor(rewards, dtype=torch.float32)
        advantages = group_advantages(reward_t, self.rl.adv_eps).flatten().to(self.device)
        batch = collate([t for g in groups for t in g], self.pad_id).to(self.device)
        passes = micro_batches(batch.input_ids.shape[0], self.rank, self.world_size, self.rl.micro_batch)
        ref_logp = self._ref_logprobs(batch, passes)
        total_tokens = batch.response_mask.sum().clamp(min=1.0)
        self.engine.train()
        stats: dict[str, float] = {}
        for _ in range(self.rl.ppo_epochs):
            sums: dict[str, float] = {}
            for (lo, hi), ref_mb in zip(passes, ref_logp):
                mb = _pass_batch(batch, lo, hi)
                logits = response_logits(self.engine, mb, self.temperature)
                logp = token_logprobs(logits, mb.response_ids)
                loss, mb_stats = grpo_loss(
                    logp, mb.old_logprobs, ref_mb, token_entropy(logits),
                    advantages[lo:hi] if hi > lo else advantages[:1], mb.response_mask,
                    clip_eps=self.rl.clip_eps, kl_coef=self.rl.kl_coef, entropy_coef=self.rl.entropy_coef,
                )
                weight = (mb.response_mask.sum() / total_tokens).item() if hi > lo else 0.0
                # x world size: DeepSpeed averages gradients over ranks, the reference sums micro-batches.
                self.engine.backward(loss * (weight * self.world_size), scale_wrt_gas=False)
                for k, v in mb_stats.items():
                    sums[k] = sums.get(k, 0.0) + v * weight
                sums["loss"] = sums.get("loss", 0.0) + loss.item() * weight
            lr = self.scheduler.get_last_lr()[0]
            self.engine.step()
            stats = {**self._sum_over_ranks(sums), "grad_norm": float(self.engine.get_global_grad_norm()), "lr": lr}
        self.scheduler.step()
        stats.update(batch_stats(reward_t, batch.response_mask))
        return stats

    def _sum_over_ranks(self, values: dict[str, float]) -> dict[str, float]:
        keys = sorted(values)
        t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return dict(zip(keys, t.tolist()))

    # ----------------------------------------------------------- weights
    def full_state_dict(self, rank0_only: bool = True) -> dict[str, torch.Tensor] | None:
        """The consolidated weights on CPU (collective: every rank calls it); None off rank 0 if `rank0_only`.

        Parameters are gathered one at a time, so no rank ever holds more
        than one full parameter beyond its shard.
        """
        keep = not rank0_only or self.rank == 0
        out: dict[str, torch.Tensor] = {}
        for name, param in self.model.named_parameters(remove_duplicate=False):
            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                if keep:
                    out[name] = param.detach().to("cpu", copy=True)
        if keep:
            persistent = self.model.state_dict().keys()
            out.update({n: b.detach().to("cpu", copy=True) for n, b in self.model.named_buffers() if n in persistent})
        return out if keep else None

    def export_hf(self, store: ObjectStore, prefix: str, tokenizer: PreTrainedTokenizerBase | None) -> None:
        """A consolidated HF folder (config, safetensors, tokenizer if given) under `prefix`, as
        `put_checkpoint` lays it out. Collective; rank 0 writes. Returns on every rank once it is stored.
        """
        publish_weights(self.engine, store, prefix, tokenizer)
        dist.barrier()

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
        with tempfile.TemporaryDirectory() as tmp:
            for name in manifest["files"]:
                other = _RANK_FILE.search(Path(name).name)
                if other and int(other.group(1)) != self.rank:
                    continue  # another rank's shard
                path = Path(tmp) / name
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(store.get(f"{prefix}/{name}"))
            _, client_state = self.engine.load_checkpoint(tmp, tag=_TAG, load_optimizer_states=True,
                                                          load_lr_scheduler_states=False)
        if client_state is None:
            raise FileNotFoundError(f"DeepSpeed found no checkpoint in {prefix}")
        self.scheduler.load_state_dict(client_state["scheduler"])
