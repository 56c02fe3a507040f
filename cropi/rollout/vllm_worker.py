"""Methods that vLLM mixes into each of its GPU workers (`worker_extension_cls`).

vLLM runs the model in worker processes (one per tensor-parallel rank), out
of reach of the process that owns the `LLM`. The engine calls these methods
on every worker through `LLM.collective_rpc`; `self` is then the worker, so
`self.model_runner.model` is that rank's shard of the model.

This module must not import vLLM at the top: vLLM imports it by name inside
its workers, and cropi imports the name only as a string.
"""

from __future__ import annotations

import torch


class WeightUpdateExtension:
    def cropi_load_weights(self, named_tensors: list[tuple[str, torch.Tensor]]) -> int:
        """Copy full (unsharded) tensors, by HF checkpoint name, into this worker's model.

        The model's own `load_weights` does the HF -> vLLM mapping (fused
        qkv / gate_up projections, tied embeddings) and keeps only this
        rank's slice, exactly as when the checkpoint was first loaded.
        Quantised models would also need `process_weights_after_loading`;
        cropi serves unquantised policies.
        """
        self.model_runner.model.load_weights(weights=named_tensors)  # type: ignore[attr-defined]
        return len(named_tensors)
