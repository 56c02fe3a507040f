"""Resolve a spec's data sources into prompts.

`builtin:arith?...` generates; anything else is a dataset file or folder.
`size` takes a seeded subset (in the original order, so ids stay readable);
`template` formats each prompt; `verifier: auto` picks exact-integer match
for built-in tasks and math-verify for files.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

from cropi.data import arith
from cropi.data.files import load_file_source
from cropi.data.types import Prompt
from cropi.errors import InputError
from cropi.seeding import stream_seed
from cropi.spec import DataSource, JobSpec

BUILTIN_ARITH = "builtin:arith"
POOL_LABEL_NOISE = 0.05  # default fraction of wrong references in a built-in pool


def load_source(src: DataSource, role: str, seed: int) -> list[Prompt]:
    """Prompts of one source; `role` ("pool" or a validation set name) seeds it.

    Different roles draw from different streams, so a validation set is not
    a copy of the pool's first prompts.
    """
    if src.source.startswith("builtin:"):
        name, _, query = src.source.partition("?")
        if name != BUILTIN_ARITH:
            raise InputError(f"unknown built-in data source {name!r}; known: {BUILTIN_ARITH}")
        noise = POOL_LABEL_NOISE if role == "pool" else 0.0
        prompts = arith.load_builtin_arith(query, src.size, seed=f"{seed}-{role}", default_noise=noise)
        verifier = "int" if src.verifier == "auto" else src.verifier
    else:
        verifier = "math" if src.verifier == "auto" else src.verifier
        prompts = load_file_source(src.source, src.prompt_field, src.answer_field, src.id_field, verifier)
        if src.size is not None and src.size < len(prompts):
            keep = sorted(random.Random(stream_seed("subset", seed, role)).sample(range(len(prompts)), src.size))
            prompts = [prompts[i] for i in keep]
    if src.template != "{prompt}":
        try:
            prompts = [replace(p, text=src.template.format(prompt=p.text)) for p in prompts]
        except (KeyError, IndexError, ValueError) as err:
            raise InputError(f"data template {src.template!r} is invalid: use {{prompt}} as the only field ({err})") from None
    return [replace(p, verifier=verifier) for p in prompts]


@dataclass
class JobData:
    pool: list[Prompt]
    validation: dict[str, list[Prompt]]
    untargeted: dict[str, list[Prompt]]
    decontaminated: int  # pool prompts dropped because an evaluation set contains them

    @property
    def eval_sets(self) -> dict[str, list[Prompt]]:
        return {**self.validation, **self.untargeted}


def load_job_data(spec: JobSpec) -> JobData:
    validation = {v.name: load_source(v, f"valid-{v.name}", spec.seed) for v in spec.data.validation}
    untargeted = {u.name: load_source(u, f"untargeted-{u.name}", spec.seed) for u in spec.data.untargeted}
    names = [v.name for v in spec.data.validation] + [u.name for u in spec.data.untargeted]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise InputError(f"data: evaluation set names must be unique, repeated: {', '.join(sorted(dupes))}")
    pool = load_source(spec.data.pool, "pool", spec.seed)
    # Never train on an evaluation prompt.
    held_out = {p.text for ps in (*validation.values(), *untargeted.values()) for p in ps}
    clean = [p for p in pool if p.text not in held_out]
    if not clean:
        raise InputError("data.pool: every pool prompt also appears in an evaluation set")
    return JobData(pool=clean, validation=validation, untargeted=untargeted, decontaminated=len(pool) - len(clean))
