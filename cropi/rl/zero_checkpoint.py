"""DeepSpeed checkpoints read back from the object store without running code.

DeepSpeed reads every file of a checkpoint (the model states, each rank's
optimizer states, the client state inside the model states) through its
engine's checkpoint engine, whose stock `TorchCheckpointEngine.load` calls
`torch.load(weights_only=False)`: whoever can write the store could plant
a pickle that runs code in the trainer. `load_safely` swaps in a checkpoint
engine that loads with `weights_only=True` instead, allowing besides tensors
and plain data only the few DeepSpeed types its ZeRO files hold (found in the
files DeepSpeed 0.19 writes on CPU: ZeRO-2 and ZeRO-3, AdamW and SGD, fp32;
fp16's dynamic loss scaler is allowed from DeepSpeed's source, GPU-only, not
from a run). The unpickler only looks the enum up by value and fills the
other objects' `__dict__`: no code named by the file runs.
"""

from __future__ import annotations

import os
import pickle
from typing import Any

import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address

# What DeepSpeed's optimizer-state files hold beyond tensors and plain data: the ZeRO stage (an int
# enum), the loss scaler (static; dynamic under fp16) and, under ZeRO-1/2, the parameters' slices.
SAFE_GLOBALS = [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


class UnsafeZeroCheckpoint(RuntimeError):
    """A stored ZeRO checkpoint file holds more than tensors, plain data and DeepSpeed's own state
    types: it is refused, not unpickled."""


def safe_load(path: str, key: str, map_location: Any = None) -> Any:
    """`torch.load(path, weights_only=True)` allowing `SAFE_GLOBALS`; anything else is refused with
    `UnsafeZeroCheckpoint` naming `key` (where the file came from)."""
    with torch.serialization.safe_globals(SAFE_GLOBALS):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as err:
            raise UnsafeZeroCheckpoint(
                f"ZeRO checkpoint file {key!r} holds objects other than tensors, plain data and DeepSpeed's "
                "checkpoint state: refused, since loading it could run code (cropi never writes such a file: "
                "something else put it in the store)") from err


class SafeCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch checkpoint engine, saving as it does, loading with `safe_load`.

    `keys` maps a local path (normalized) to the store key its bytes came from, for the error; a
    path not in it is named as it is.
    """

    def __init__(self, stock: TorchCheckpointEngine):
        # Not TorchCheckpointEngine.__init__: take over the stock engine's settings as they are.
        self.__dict__.update(vars(stock))
        self.keys: dict[str, str] = {}

    def load(self, path: str, map_location: Any = None) -> Any:
        return safe_load(path, self.keys.get(os.path.normpath(path), str(path)), map_location)


def load_safely(engine: Any) -> SafeCheckpointEngine:
    """Make a `DeepSpeedEngine` read its checkpoints with `safe_load` (call right after
    `deepspeed.initialize`). Only DeepSpeed's default torch checkpoint engine is replaced: another
    one (fast, decoupled, DataStates writers) has its own `torch.load`, so it is refused."""
    stock = engine.checkpoint_engine
    if isinstance(stock, SafeCheckpointEngine):
        return stock
    if type(stock) is not TorchCheckpointEngine:
        raise TypeError(f"DeepSpeed checkpoint engine {type(stock).__name__} is not the torch one: cropi cannot "
                        "make it load checkpoints from the store safely")
    engine.checkpoint_engine = SafeCheckpointEngine(stock)
    return engine.checkpoint_engine
