"""HF-format model folders (config, safetensors, tokenizer) as objects in the store.

One object per file under a prefix, so a stored checkpoint downloads back
into a folder that `from_pretrained` (or `model.path`) loads as it is.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from cropi.runtime.store import ObjectStore


def put_hf_folder(store: ObjectStore, prefix: str, model: Any, tokenizer: Any = None,
                  state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """`model.save_pretrained` (with `state_dict` instead of the model's own, e.g. gathered ZeRO-3
    weights) and the tokenizer, stored under `prefix/`."""
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, state_dict=state_dict)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)  # a complete folder: usable as model.path
        for path in sorted(Path(tmp).iterdir()):
            store.put(f"{prefix}/{path.name}", path.read_bytes())


def get_hf_folder(store: ObjectStore, prefix: str, folder: Path) -> Path:
    """Download what `put_hf_folder` stored under `prefix/` into `folder`."""
    keys = store.list(prefix + "/")
    if not keys:
        raise FileNotFoundError(f"no checkpoint under {prefix}/ in the store")
    folder.mkdir(parents=True, exist_ok=True)
    for key in keys:
        (folder / key.rsplit("/", 1)[1]).write_bytes(store.get(key))
    return folder
