"""Trainer -> rollout weight sync: a torch.distributed broadcast path and an object-store path.

Broadcast path. The trainer's rank 0 and the rollout replicas form a small
process group of their own (rank 0 sends, ranks 1..R receive), separate from
the trainer's default group: it is built from a TCPStore and a backend object
(gloo on CPU, NCCL on GPU) constructed directly, because `init_process_group`
would replace the trainer's default group. Replicas take their rank from the
store, so they need not know their index. Every trainer rank walks the model
in buckets of about `bucket_bytes`; a ZeRO-3 model's partitioned parameters
are gathered one bucket at a time (a collective over the trainer ranks), so no
rank ever holds more than one bucket beyond its shard. Rank 0 packs a bucket
into one flat byte buffer (mixed dtypes, one broadcast per bucket whatever
the dtypes) and broadcasts a JSON header (names, dtypes, shapes, offsets,
version, last-bucket flag), then the buffer.

Store path. `publish_weights` writes the gathered weights as a consolidated
HF folder (same layout as the stage checkpoints, usable as `model.path`) and
a replica reads them back with `published_weights` (its
`RolloutReplica.load_weights_from_store`). Prefer it for
small models, where a few MB through the store cost less than a standing
process group, and for replicas that join late or cannot reach the trainer's
network (the broadcast group is fixed at creation and needs a direct route
from every replica to the trainer).
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from cropi.runtime.hf_store import put_hf_folder
from cropi.runtime.store import ObjectStore

Apply = Callable[[list[tuple[str, torch.Tensor]], int], None]  # (named tensors of one bucket, version)

_ALIGN = 16  # byte offset of every tensor in a bucket: its dtype view needs aligned storage
_RANK_KEY, _WORLD_KEY = "sync/rank", "sync/world_size"


class SyncClosed(ConnectionError):
    """The sender closed the sync group: no more versions will come."""


@dataclass
class SyncGroup:
    """One end of the trainer -> rollout broadcast group."""

    pg: Any  # a torch.distributed Backend (ProcessGroupGloo / ProcessGroupNCCL)
    store: dist.TCPStore  # kept: the sender's is the group's rendezvous server
    rank: int
    world_size: int
    device: torch.device
    timeout: timedelta

    @classmethod
    def create_sender(cls, host: str, port: int, receivers: int, backend: str = "gloo",
                      timeout_s: float = 600.0) -> SyncGroup:
        """Rank 0 (the trainer's rank 0); returns once all `receivers` replicas have joined."""
        timeout = timedelta(seconds=timeout_s)
        store = dist.TCPStore(host, port, None, True, timeout, wait_for_workers=False)
        store.set(_WORLD_KEY, str(receivers + 1))
        return cls._connect(store, 0, receivers + 1, backend, timeout)

    @classmethod
    def join_receiver(cls, host: str, port: int, backend: str = "gloo", timeout_s: float = 600.0) -> SyncGroup:
        """A rollout replica joins the sender's group at host:port, taking the next free rank."""
        timeout = timedelta(seconds=timeout_s)
        store = dist.TCPStore(host, port, None, False, timeout)
        rank = store.add(_RANK_KEY, 1)
        world_size = int(store.get(_WORLD_KEY))
        if rank >= world_size:
            raise RuntimeError(f"weight sync group at {host}:{port} is full ({world_size - 1} receivers)")
        return cls._connect(store, rank, world_size, backend, timeout)

    @classmethod
    def _connect(cls, store: dist.TCPStore, rank: int, world_size: int, backend: str,
                 timeout: timedelta) -> SyncGroup:
        prefixed = dist.PrefixStore("sync/pg", store)
        if backend == "gloo":
            # Gloo picks its interface from the hostname (set GLOO_SOCKET_IFNAME to choose).
            pg = dist.ProcessGroupGloo(prefixed, rank, world_size, timeout)
            device = torch.device("cpu")
        elif backend == "nccl":
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = timeout
            pg = dist.ProcessGroupNCCL(prefixed, rank, world_size, options)
            device = torch.device("cuda", torch.cuda.current_device())
        else:
            raise ValueError(f"weight sync backend must be gloo or nccl, not {backend!r}")
        return cls(pg, store, rank, world_size, device, timeout)

    def broadcast(self, tensor: torch.Tensor, timeout: timedelta | None = None) -> None:
        self.pg.broadcast(tensor, 0, timeout or self.timeout).wait()

    def close(self) -> None:
        """Sender: tell the receivers that no more versions come (best effort), then leave."""
        if self.rank == 0:
            try:
                _broadcast_header(self, {"closed": True}, timedelta(seconds=10))
            except RuntimeError:  # a receiver is gone already; the others see the connection close
                pass
        self.pg.shutdown()


# ---------------------------------------------------------------------------
# Walking a (possibly ZeRO-3 partitioned) model bucket by bucket.


def _unwrap(model: nn.Module) -> nn.Module:
    # Only a process that imported deepspeed can hold a DeepSpeedEngine or ZeRO-3 parameters.
    if "deepspeed" in sys.modules:
        from deepspeed import DeepSpeedEngine

        if isinstance(model, DeepSpeedEngine):
            return model.module
    return model


def _is_partitioned(t: torch.Tensor) -> bool:
    return hasattr(t, "ds_id")


def _full_nbytes(t: torch.Tensor) -> int:
    numel = t.ds_numel if _is_partitioned(t) else t.numel()
    return numel * t.element_size()


def named_weights(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """What a rollout replica needs, by HF name: parameters (shared ones once) and persistent buffers.

    Non-persistent buffers (rotary frequencies, masks) are derived from the
    config and absent from checkpoints, so receivers already have them.
    """
    named, seen = [], set()
    for mod_name, module in _unwrap(model).named_modules():
        local = list(module.named_parameters(recurse=False)) + [
            (name, buf) for name, buf in module.named_buffers(recurse=False)
            if name not in module._non_persistent_buffers_set]
        for name, t in local:
            if id(t) not in seen:  # tied weights travel once, under their first name
                seen.add(id(t))
                named.append((f"{mod_name}.{name}" if mod_name else name, t))
    return named


def gathered_buckets(model: nn.Module, bucket_bytes: int) -> Iterator[tuple[list[tuple[str, torch.Tensor]], bool]]:
    """(bucket, is_last) with full tensors, valid until the next item; call on every trainer rank.

    For a ZeRO-3 model each bucket's parameters are gathered on entry and
    re-partitioned when the next bucket is requested: a collective, so every
    rank must consume the whole iterator. A tensor larger than `bucket_bytes`
    travels alone.
    """
    buckets: list[list[tuple[str, torch.Tensor]]] = [[]]
    size = 0
    for name, t in named_weights(model):
        nbytes = _full_nbytes(t)
        if buckets[-1] and size + nbytes > bucket_bytes:
            buckets.append([])
            size = 0
        buckets[-1].append((name, t))
        size += nbytes
    for i, bucket in enumerate(buckets):
        partitioned = [t for _, t in bucket if _is_partitioned(t)]
        if partitioned:
            import deepspeed

            ctx: Any = deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None)
        else:
            ctx = nullcontext()
        with ctx:
            yield [(name, t.detach()) for name, t in bucket], i == len(buckets) - 1


# ---------------------------------------------------------------------------
# The broadcast path.


def _broadcast_header(group: SyncGroup, header: dict[str, Any], timeout: timedelta | None = None) -> None:
    payload = torch.frombuffer(bytearray(json.dumps(header).encode()), dtype=torch.uint8).to(group.device)
    group.broadcast(torch.tensor([payload.numel()], dtype=torch.int64, device=group.device), timeout)
    group.broadcast(payload, timeout)


def _receive_header(group: SyncGroup) -> dict[str, Any]:
    length = torch.zeros(1, dtype=torch.int64, device=group.device)
    group.broadcast(length)
    payload = torch.empty(int(length.item()), dtype=torch.uint8, device=group.device)
    group.broadcast(payload)
    return json.loads(payload.cpu().numpy().tobytes())


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def _send_bucket(group: SyncGroup, bucket: list[tuple[str, torch.Tensor]], version: int, last: bool) -> int:
    entries, offset = [], 0
    for name, t in bucket:
        entries.append([name, str(t.dtype).removeprefix("torch."), list(t.shape), offset])
        offset = _aligned(offset + t.numel() * t.element_size())
    flat = torch.empty(offset, dtype=torch.uint8, device=group.device)
    for (_, t), (_, _, _, start) in zip(bucket, entries):
        nbytes = t.numel() * t.element_size()
        flat[start : start + nbytes].copy_(t.contiguous().reshape(-1).view(torch.uint8))
    _broadcast_header(group, {"version": version, "last": last, "nbytes": offset, "tensors": entries})
    group.broadcast(flat)
    return offset


def send_weights(model: nn.Module, group: SyncGroup | None, version: int,
                 bucket_bytes: int = 64 << 20) -> dict[str, float]:
    """Broadcast the model's weights as `version`; call on every trainer rank (`group` only on rank 0).

    `model` is a plain module, a ZeRO-3 partitioned one or its DeepSpeedEngine.
    Returns what was sent (tensors, bytes, buckets) and the seconds it took.
    """
    start = time.perf_counter()
    tensors = sent = buckets = 0
    for bucket, last in gathered_buckets(model, bucket_bytes):
        tensors += len(bucket)
        buckets += 1
        if group is not None:
            sent += _send_bucket(group, bucket, version, last)
    return {"tensors": tensors, "bytes": sent, "buckets": buckets, "seconds": time.perf_counter() - start}


def receive_weights(group: SyncGroup, apply: Apply) -> int:
    """Receive one version, calling `apply` once per bucket as it arrives; returns the version.

    Per bucket rather than once at the end so that a replica never holds a
    second copy of the model (a 7B policy would not fit twice on a rollout
    GPU). The replica's model is therefore a mix of versions until this
    returns: do not sample meanwhile, and announce the version only after.
    Raises `SyncClosed` when the sender closed the group.
    """
    while True:
        header = _receive_header(group)
        if header.get("closed"):
            raise SyncClosed("the trainer closed the weight sync group")
        flat = torch.empty(header["nbytes"], dtype=torch.uint8, device=group.device)
        group.broadcast(flat)
        named = []
        for name, dtype_name, shape, start in header["tensors"]:
            dtype = getattr(torch, dtype_name)
            nbytes = math.prod(shape) * dtype.itemsize
            named.append((name, flat[start : start + nbytes].view(dtype).view(shape)))
        apply(named, header["version"])
        if header["last"]:
            return header["version"]


def copy_weights(targets: dict[str, torch.Tensor], named: list[tuple[str, torch.Tensor]]) -> None:
    """Copy `named` tensors into `targets` by name; names are checked first, so a bad update changes nothing."""
    unknown = [name for name, _ in named if name not in targets]
    if unknown:
        raise KeyError(f"received weights {unknown[:5]} are not parameters or buffers of the local model")
    with torch.no_grad():
        for name, t in named:
            targets[name].copy_(t)


# ---------------------------------------------------------------------------
# The object-store path.


def publish_weights(model: nn.Module, store: ObjectStore, prefix: str, tokenizer: Any = None,
                    bucket_bytes: int = 64 << 20) -> None:
    """Store the weights under `prefix/` as a consolidated HF folder; call on every trainer rank.

    ZeRO-3 parameters are gathered bucket by bucket into a CPU state dict on
    rank 0 (the whole model in host memory: the path is for small models),
    which alone writes. Same layout as `workers.put_checkpoint`, one object per
    file. A reader must not load while the next version is being written:
    announce a version only once this returned.
    """
    writer = not dist.is_initialized() or dist.get_rank() == 0
    state: dict[str, torch.Tensor] = {}
    for bucket, _ in gathered_buckets(model, bucket_bytes):
        if writer:
            state.update((name, t.to("cpu", copy=True)) for name, t in bucket)
    if writer:
        put_hf_folder(store, prefix, _unwrap(model), tokenizer, state)


def published_weights(store: ObjectStore, prefix: str) -> list[tuple[str, torch.Tensor]]:
    """The named tensors of an HF folder in the store (e.g. for vLLM's `load_weights`)."""
    from safetensors.torch import load

    keys = [k for k in store.list(prefix + "/") if k.endswith(".safetensors")]
    if not keys:
        raise FileNotFoundError(f"no safetensors weights under {prefix}/ in the store")
    return [item for key in sorted(keys) for item in load(store.get(key)).items()]
