"""What a job will cost, before it runs (`cropi validate`): generations, gradient work, GRPO
rollouts and store bytes, from the spec and its loaded data.

Counts are exact where the spec fixes them and upper bounds where the offline rewards decide
(only prompts with mixed rewards are projected; a stopped-early run does fewer stages):

    offline generations   (pool + targeted validation prompts) x offline.n_pool / n_valid
                          (selectors that read offline rewards only)
    backward passes       per projection stage: one per scored prompt group, pool prompts
                          (or influence.candidates) plus up to max_valid_prompts per validation set
    GRPO rollouts         total_steps x rl.batch_prompts x rollout.n
    store bytes           offline parts <= generations x max_new_tokens x 12 B (token id, log-prob,
                          text; before compression); projected gradients = prompts x (proj_dim x 2 B
                          + 4 B) per projection stage; checkpoints = parameters x bytes/param per
                          stage (one at each later stage's start, one final); the trainer state
                          = parameters x (4 B + optimizer's 8 B Adam / 4 B SGD), overwritten in place

The parameter count is exact for the built-in model (its recipe), read from a local folder's
safetensors headers (else estimated from its config.json), and unknown for a hub id.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

from cropi.curriculum.selection import needs_offline, needs_projection
from cropi.data.sources import JobData
from cropi.spec import JobSpec

OFFLINE_BYTES_PER_TOKEN = 12  # int32 token id + float32 log-prob + ~4 B of text
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_SAFETENSORS_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                      "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


@dataclass
class Estimate:
    pool_prompts: int
    validation_prompts: int  # targeted sets, summed
    untargeted_prompts: int
    offline_generations: int
    projection_stages: int
    scored_per_stage: int  # pool prompt groups scored per projection stage (at most)
    targets_per_stage: int  # validation prompt groups projected per projection stage (at most)
    grpo_steps: int
    rollouts_per_step: int
    rollouts: int
    parameters: int | None
    parameters_from: str  # how the count was found ("built-in recipe", "safetensors", ...) or why unknown
    bytes_per_param: int
    offline_bytes: int
    gradient_bytes: int
    checkpoints: int
    checkpoint_bytes: int | None
    trainer_state_bytes: int | None

    @property
    def backward_passes(self) -> int:
        return self.projection_stages * (self.scored_per_stage + self.targets_per_stage)

    @property
    def store_bytes(self) -> int:
        """What the job stores, with unknown parts (a hub model's checkpoints) counted as 0."""
        return (self.offline_bytes + self.gradient_bytes + (self.checkpoint_bytes or 0)
                + (self.trainer_state_bytes or 0))


def llama_parameters(cfg: dict) -> int:
    """Parameters of a Llama-style decoder (no biases) from its HF config."""
    h, layers, inter, vocab = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"], cfg["vocab_size"]
    heads = cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or h // heads
    attention = h * heads * head_dim * 2 + h * kv * head_dim * 2
    per_layer = attention + 3 * h * inter + 2 * h
    return vocab * h * (1 if cfg.get("tie_word_embeddings", False) else 2) + layers * per_layer + h


def _safetensors_parameters(folder: Path) -> int | None:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for f in files:
        with f.open("rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        total += sum(math.prod(t["shape"]) for k, t in header.items() if k != "__metadata__")
    return total


def model_parameters(path: str) -> tuple[int | None, str]:
    """(parameter count, how it was found) of `model.path`; (None, why) when it cannot be known here."""
    if path.startswith("builtin:"):
        from cropi.models.tiny import TinyRecipe
        from cropi.models.tokenizer import build_char_tokenizer

        r = TinyRecipe.from_query(path.partition("?")[2])
        return llama_parameters({"hidden_size": r.hidden, "num_hidden_layers": r.layers, "num_attention_heads": r.heads,
                                 "intermediate_size": r.intermediate, "vocab_size": len(build_char_tokenizer())}), \
            "the built-in recipe"
    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        return None, "unknown (a hub id: its config is not read here)"
    try:
        found = _safetensors_parameters(folder)
        if found is not None:
            return found, "its safetensors headers"
        return llama_parameters(json.loads((folder / "config.json").read_text())), "its config.json (Llama-style estimate)"
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        return None, "unknown (its config.json and weights do not say)"


def bytes_per_param(spec: JobSpec, device_type: str) -> int:
    """Bytes of one stored weight: model.dtype, or auto's choice on `device_type` (bfloat16 on CUDA)."""
    if spec.model.dtype != "auto":
        return DTYPE_BYTES[spec.model.dtype]
    return 2 if device_type == "cuda" else 4


def estimate(spec: JobSpec, data: JobData, device_type: str = "cpu") -> Estimate:
    inf, off, cur = spec.influence, spec.offline, spec.curriculum
    pool = len(data.pool)
    valid = {name: len(prompts) for name, prompts in data.validation.items()}
    offline = needs_offline(spec)
    generations = (pool * off.n_pool + sum(valid.values()) * off.n_valid) if offline else 0
    projections = sum(needs_projection(spec, s) for s in range(cur.stages))
    scored = min(pool, inf.candidates) if inf.candidates is not None else pool
    targets = sum(min(n, inf.max_valid_prompts) for n in valid.values())
    params, source = model_parameters(spec.model.path)
    per = bytes_per_param(spec, device_type)
    optimizer = 8 if spec.rl.optimizer == "adamw" else 4
    per_step = spec.rl.batch_prompts * spec.rollout.n
    return Estimate(
        pool_prompts=pool, validation_prompts=sum(valid.values()),
        untargeted_prompts=sum(len(p) for p in data.untargeted.values()),
        offline_generations=generations, projection_stages=projections,
        scored_per_stage=scored if projections else 0, targets_per_stage=targets if projections else 0,
        grpo_steps=spec.total_steps, rollouts_per_step=per_step, rollouts=spec.total_steps * per_step,
        parameters=params, parameters_from=source, bytes_per_param=per,
        offline_bytes=generations * spec.rollout.max_new_tokens * OFFLINE_BYTES_PER_TOKEN,
        gradient_bytes=projections * (scored + targets) * (inf.proj_dim * 2 + 4),
        checkpoints=cur.stages,
        checkpoint_bytes=None if params is None else cur.stages * params * per,
        trainer_state_bytes=None if params is None else params * (4 + optimizer),
    )


def human_bytes(n: int | None) -> str:
    if n is None:
        return "unknown"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def estimate_lines(e: Estimate) -> list[str]:
    """The estimate as `cropi validate` prints it."""
    params = "unknown" if e.parameters is None else f"{e.parameters:,}"
    return [
        f"data: pool {e.pool_prompts} prompts, validation {e.validation_prompts}, untargeted {e.untargeted_prompts}",
        f"offline generations: {e.offline_generations:,}",
        f"gradient backward passes: {e.backward_passes:,} (at most; {e.projection_stages} projection stage(s) x "
        f"({e.scored_per_stage} pool + {e.targets_per_stage} validation prompt groups))",
        f"GRPO: {e.grpo_steps} steps x {e.rollouts_per_step} rollouts = {e.rollouts:,} rollouts",
        f"model parameters: {params} ({e.parameters_from}), {e.bytes_per_param} B each",
        f"store: offline parts <= {human_bytes(e.offline_bytes)}, projected gradients {human_bytes(e.gradient_bytes)}, "
        f"checkpoints {human_bytes(e.checkpoint_bytes)} ({e.checkpoints}), "
        f"trainer state {human_bytes(e.trainer_state_bytes)}; total "
        f"{'>= ' if e.checkpoint_bytes is None else ''}{human_bytes(e.store_bytes)}",
    ]
