"""Resolve a spec's data sources into prompts.

`builtin:arith?...` generates; anything else is a dataset file or folder.
`size` takes a seeded subset (in the original order, so ids stay readable);
`template` formats each prompt or applies the chat template (`templates.py`);
`verifier: auto` picks exact-integer match for built-in tasks and
math-verify for files; `verifier_by_source` picks one per row by its
`data_source`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import Any

from cropi.data import arith
from cropi.data.access import DataAccess
from cropi.data.files import load_file_source
from cropi.data.templates import CHAT, chat_prompts, check_context, format_prompts
from cropi.data.types import Prompt, row_label
from cropi.errors import InputError
from cropi.seeding import stream_seed
from cropi.spec import DataSource, JobSpec

BUILTIN_ARITH = "builtin:arith"
POOL_LABEL_NOISE = 0.05  # default fraction of wrong references in a built-in pool


def load_source(src: DataSource, role: str, seed: int, tokenizer: Any = None, field: str = "data",
                access: DataAccess | None = None) -> list[Prompt]:
    """Prompts of one source; `role` ("pool" or a validation set name) seeds it; `field` is its spec path;
    `access`: which paths may be read (default: this process's policy, `access.py`).

    Different roles draw from different streams, so a validation set is not
    a copy of the pool's first prompts.
    """
    if src.source.startswith("builtin:"):
        name, _, query = src.source.partition("?")
        if name != BUILTIN_ARITH:
            raise InputError(f"{field}.source: unknown built-in data source {name!r}; known: {BUILTIN_ARITH}")
        noise = POOL_LABEL_NOISE if role == "pool" else 0.0
        try:
            prompts = arith.load_builtin_arith(query, src.size, seed=f"{seed}-{role}", default_noise=noise)
        except InputError as err:  # which of the job's sources (arith's own message names the query key)
            raise InputError(f"{field}.source: {err}") from None
        verifier = "int" if src.verifier == "auto" else src.verifier
    else:
        verifier = "math" if src.verifier == "auto" else src.verifier
        prompts = load_file_source(src.source, src.prompt_field, src.answer_field, src.id_field, verifier,
                                   src.data_source_field, f"{field}.source", access)
        if src.size is not None and src.size < len(prompts):
            keep = sorted(random.Random(stream_seed("subset", seed, role)).sample(range(len(prompts)), src.size))
            prompts = [prompts[i] for i in keep]
    if src.template == CHAT:
        if tokenizer is None:
            raise InputError(f"{field}.template: 'chat' needs the model's tokenizer")
        prompts = chat_prompts(prompts, tokenizer, src.system_prompt, f"{field}.template")
    else:
        prompts = format_prompts(prompts, src.template, f"{field}.template")
    return [replace(p, verifier=_row_verifier(src, p, verifier, field)) for p in prompts]


def _row_verifier(src: DataSource, prompt: Prompt, verifier: str, field: str) -> str:
    """The verifier of one row: `verifier_by_source` by its data_source where given, else the source's."""
    if not src.verifier_by_source:
        return verifier
    by = src.verifier_by_source
    source = prompt.meta.get("data_source")
    chosen = by.get(source) if source is not None else None
    chosen = chosen or by.get("default")
    if chosen is None:
        where = prompt.meta["where"] if "where" in prompt.meta else row_label(prompt)
        raise InputError(f"{field}.verifier_by_source: {where} has a data_source that is not a key and there is "
                         "no 'default' key")
    return "math" if chosen == "auto" else chosen


@dataclass
class JobData:
    pool: list[Prompt]
    validation: dict[str, list[Prompt]]
    untargeted: dict[str, list[Prompt]]
    decontaminated: int  # pool prompts dropped because an evaluation set contains them

    @property
    def eval_sets(self) -> dict[str, list[Prompt]]:
        return {**self.validation, **self.untargeted}


def load_job_data(spec: JobSpec, tokenizer: Any = None, access: DataAccess | None = None) -> JobData:
    """Every set of the job's prompts. The model's tokenizer (loaded from `model.path` unless given)
    renders chat templates and checks that prompts fit the model's context; with the built-in model
    and no chat template it is not needed. `access`: which paths may be read (default: this process's)."""
    sources = [spec.data.pool, *spec.data.validation, *spec.data.untargeted]
    chat = any(s.template == CHAT for s in sources)
    max_positions = None
    if tokenizer is None and (chat or not spec.model.path.startswith("builtin:")):
        from cropi.models.loading import load_tokenizer  # lazily: the controller needs no model otherwise

        try:
            tokenizer, max_positions = load_tokenizer(spec.model.path)
        except InputError:
            if chat:
                raise
            # Only the context check needed it: a controller without the model's files skips it,
            # and the workers, which load the model, run it.
            tokenizer = None
    validation = {v.name: load_source(v, f"valid-{v.name}", spec.seed, tokenizer, f"data.validation[{i}]", access)
                  for i, v in enumerate(spec.data.validation)}
    untargeted = {u.name: load_source(u, f"untargeted-{u.name}", spec.seed, tokenizer, f"data.untargeted[{i}]",
                                     access)
                  for i, u in enumerate(spec.data.untargeted)}
    names = [v.name for v in spec.data.validation] + [u.name for u in spec.data.untargeted]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise InputError(f"data: evaluation set names must be unique, repeated: {', '.join(sorted(dupes))}")
    pool = load_source(spec.data.pool, "pool", spec.seed, tokenizer, "data.pool", access)
    if max_positions is not None:
        for name, prompts in [("pool", pool), *validation.items(), *untargeted.items()]:
            check_context(prompts, tokenizer, max_positions, spec.rollout.max_new_tokens, name)
    # Never train on an evaluation prompt.
    held_out = {p.text for ps in (*validation.values(), *untargeted.values()) for p in ps}
    clean = [p for p in pool if p.text not in held_out]
    if not clean:
        raise InputError("data.pool: every pool prompt also appears in an evaluation set")
    return JobData(pool=clean, validation=validation, untargeted=untargeted, decontaminated=len(pool) - len(clean))
