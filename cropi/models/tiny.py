"""`builtin:tiny-arith`: a ~1M-parameter Llama-architecture model with a
character tokenizer, warm-started by a short supervised pass on arithmetic.

The warm start is deliberately short: the base policy should be partly
competent (easy prompts solved, hard ones not) so that RL has something to
improve and prompts differ in learnability, as with a real 1.5B base model.

It also imitates what makes RLVR work on real base models: latent
capability that sampling finds and greedy decoding does not. In its corpus a
share of the exercises (`confusion`, 0.6) is answered with the skill's
typical strategy mistake (`data/arith.py`: add as a-b, max as min, rev left
unreversed, sort descending, ...). The base policy therefore knows both
strategies and greedily prefers the wrong one on most prompts of a skill it
can compute, so pass@8 is several times greedy accuracy; GRPO lifts greedy
accuracy towards pass@k by shifting that preference, and the shift is
learned per skill. Measured with `cropi bench testbed` (docs/performance.md).

Two earlier mechanisms were measured and dropped: a "run-on" quirk
(`ramble_arith`, `ramble_other`: worksheets where a next exercise follows
the answer) made stopping the main lesson, shared by every prompt, so any
prompt taught it; without any quirk the errors are idiosyncratic digit
slips that RL does not fix (greedy accuracy drifts down). Both options
remain for experiments and default to 0.

The result is an ordinary HF folder cached under ``$CROPI_CACHE`` (default
``~/.cache/cropi``) keyed by everything that determines its weights.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import parse_qsl

import torch
from filelock import FileLock
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from cropi.data import arith
from cropi.errors import InputError
from cropi.models.tokenizer import build_char_tokenizer
from cropi.seeding import stream_seed

BUILDER_VERSION = 3  # bump when the recipe changes so old caches are not reused


@dataclass(frozen=True)
class TinyRecipe:
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    intermediate: int = 512
    max_positions: int = 128
    sft_steps: int = 800
    sft_batch: int = 256
    sft_lr: float = 2e-3
    ramble_arith: float = 0.0  # P(next exercise follows) after an add/sub/mul answer
    ramble_other: float = 0.0  # same after max/rev/sort
    confusion: float = 0.6  # P(an exercise is answered with its skill's confused strategy)
    seed: int = 0

    @classmethod
    def from_query(cls, query: str) -> TinyRecipe:
        fields = cls.__dataclass_fields__
        kwargs = {}
        for key, value in parse_qsl(query, keep_blank_values=True):
            if key not in fields:
                raise InputError(f"builtin:tiny-arith: unknown option {key!r}; known: {', '.join(fields)}")
            try:
                kwargs[key] = type(getattr(cls, key))(value)
            except ValueError:  # the message never repeats the value
                raise InputError(f"builtin:tiny-arith: option {key} is not a valid number") from None
        recipe = cls(**kwargs)
        recipe.check()
        return recipe

    def check(self) -> None:
        """InputError naming the first option that cannot build a model (checked before building,
        so that a submit is refused, not a worker's build failing)."""
        for key in ("hidden", "layers", "heads", "intermediate", "max_positions", "sft_batch"):
            if getattr(self, key) < 1:
                raise InputError(f"builtin:tiny-arith: option {key} must be at least 1")
        if self.sft_steps < 0:
            raise InputError("builtin:tiny-arith: option sft_steps must be at least 0")
        if self.hidden % self.heads:
            raise InputError("builtin:tiny-arith: option hidden must be a multiple of option heads")
        if not (math.isfinite(self.sft_lr) and self.sft_lr > 0):
            raise InputError("builtin:tiny-arith: option sft_lr must be a positive finite number")
        for key in ("ramble_arith", "ramble_other", "confusion"):
            if not 0 <= getattr(self, key) <= 1:  # NaN fails this too
                raise InputError(f"builtin:tiny-arith: option {key} must be a probability in [0, 1]")

    def cache_key(self) -> str:
        blob = json.dumps({"v": BUILDER_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cache_root() -> Path:
    return Path(os.environ.get("CROPI_CACHE", Path.home() / ".cache" / "cropi"))


ARITH_SKILLS = {"add", "sub", "mul"}


def _sft_batch(tok: PreTrainedTokenizerBase, docs: list[list[arith.Prompt]]) -> dict[str, torch.Tensor]:
    """Right-padded documents `<bos> p1 a1 [\\n p2 a2] <eos>`.

    Loss on answers, on what follows each answer (newline or EOS) and on the
    exercises that follow a newline (so that a base policy which runs on
    writes a real next exercise, as a pretrained model would), but not on the
    first prompt: that is the user's.
    """
    rows, labels = [], []
    newline = tok("\n", add_special_tokens=False)["input_ids"]
    for doc in docs:
        row, lab = [], []
        for i, p in enumerate(doc):
            prompt_ids = tok(p.text, add_special_tokens=(i == 0))["input_ids"]
            after = [tok.eos_token_id] if i == len(doc) - 1 else newline
            answer_ids = tok(p.answer, add_special_tokens=False)["input_ids"] + after
            row += prompt_ids + answer_ids
            lab += ([-100] * len(prompt_ids) if i == 0 else prompt_ids) + answer_ids
        rows.append(row)
        labels.append(lab)
    width = max(map(len, rows))
    pad = tok.pad_token_id
    input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    label_t = torch.tensor([lab + [-100] * (width - len(lab)) for lab in labels])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return {"input_ids": input_ids, "attention_mask": mask, "labels": label_t}


def _maybe_confused(p: arith.Prompt, confusion: float, rng: random.Random) -> arith.Prompt:
    if confusion and rng.random() < confusion:
        return dataclasses.replace(p, answer=p.meta["confused_answer"])
    return p


def build_tiny_model(
    recipe: TinyRecipe, out_dir: Path, progress: Callable[[int, int, float], None] | None = None
) -> None:
    """Initialise, warm-start and save the model + tokenizer into `out_dir`."""
    torch.manual_seed(recipe.seed)
    tok = build_char_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=recipe.hidden,
        num_hidden_layers=recipe.layers,
        num_attention_heads=recipe.heads,
        num_key_value_heads=recipe.heads,
        intermediate_size=recipe.intermediate,
        max_position_embeddings=recipe.max_positions,
        # Untied: a tied model built under deepspeed.zero.Init initialises wrongly.
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    # SFT data comes from its own stream, never the pools' (which use job seeds).
    data = arith.generate(recipe.sft_steps * recipe.sft_batch, seed=f"sft-{recipe.seed}")
    followers = arith.generate(recipe.sft_steps * recipe.sft_batch, seed=f"sft-next-{recipe.seed}")
    rng = random.Random(stream_seed("sft-docs", recipe.seed))
    data = [_maybe_confused(p, recipe.confusion, rng) for p in data]
    followers = [_maybe_confused(p, recipe.confusion, rng) for p in followers]
    docs = []
    for first, second in zip(data, followers):
        ramble = recipe.ramble_arith if first.meta["skill"] in ARITH_SKILLS else recipe.ramble_other
        docs.append([first, second] if rng.random() < ramble else [first])
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.sft_lr, weight_decay=0.01)
    warmup = max(1, recipe.sft_steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, recipe.sft_steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    for step in range(recipe.sft_steps):
        batch = _sft_batch(tok, docs[step * recipe.sft_batch : (step + 1) * recipe.sft_batch])
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if progress is not None:
            progress(step + 1, recipe.sft_steps, loss.item())
    model.eval()
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    (out_dir / "cropi_recipe.json").write_text(json.dumps(asdict(recipe), indent=2))


def ensure_tiny_model(
    query: str = "", progress: Callable[[int, int, float], None] | None = None
) -> Path:
    """Path of the cached model for this recipe, building it on first use.

    A file lock makes concurrent callers (parallel tests, two terminals)
    build it once; the folder appears atomically by rename.
    """
    recipe = TinyRecipe.from_query(query)
    root = cache_root() / "models"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"tiny-arith-{recipe.cache_key()}"
    with FileLock(str(final) + ".lock"):
        if (final / "config.json").is_file():
            return final
        tmp = Path(tempfile.mkdtemp(prefix=final.name + ".", dir=root))
        try:
            build_tiny_model(recipe, tmp, progress)
            tmp.rename(final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final
