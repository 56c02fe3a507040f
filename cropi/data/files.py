"""Prompts from real dataset files: JSONL, Parquet, or a folder written by
HF `datasets`' `Dataset.save_to_disk`.

Every problem with the file is an `InputError` that names the file and the
row (1-based line for JSONL, since that is what an editor shows; 0-based row
index for tabular formats, since that is what `datasets`/pandas show)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cropi.data.types import Prompt
from cropi.errors import InputError

ACCEPTED = "a .jsonl file, a .parquet file, or a folder saved with datasets' save_to_disk"

# (location label such as "line 3" or "row 0", row dict)
Row = tuple[str, dict[str, Any]]


def load_file_source(
    path: str, prompt_field: str, answer_field: str, id_field: str | None, verifier: str
) -> list[Prompt]:
    """Read every row of `path` into a Prompt; see the module docstring for formats."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"data file {path}: not found (expected {ACCEPTED})")
    if p.is_dir():
        rows = _hf_rows(p)
    elif p.suffix.lower() == ".jsonl":
        rows = _jsonl_rows(p)
    elif p.suffix.lower() == ".parquet":
        rows = _parquet_rows(p)
    else:
        kind = repr(p.suffix) if p.suffix else "(no extension)"
        raise InputError(f"data file {path}: unsupported file type {kind}; expected {ACCEPTED}")

    prompts: list[Prompt] = []
    where_seen: dict[str, str] = {}
    for index, (where, row) in enumerate(rows):
        at = f"data file {path}, {where}"
        text = _required(row, prompt_field, at)
        if not isinstance(text, str):
            raise InputError(f"{at}: field {prompt_field!r} must be a string, got {type(text).__name__}")
        answer = _required(row, answer_field, at)
        pid = str(_required(row, id_field, at)) if id_field else f"{index:06d}"
        if pid in where_seen:
            raise InputError(f"{at}: duplicate id {pid!r} (first seen at {where_seen[pid]})")
        where_seen[pid] = where
        prompts.append(Prompt(id=pid, text=text, answer=str(answer), verifier=verifier, meta={}))

    if not prompts:
        raise InputError(f"data file {path}: no rows")
    return prompts


def _required(row: dict[str, Any], name: str, at: str) -> Any:
    if name not in row:
        raise InputError(f"{at}: missing field {name!r}")
    if row[name] is None:
        raise InputError(f"{at}: field {name!r} is null")
    return row[name]


def _jsonl_rows(p: Path) -> Iterator[Row]:
    with p.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"data file {p}, line {lineno}: malformed JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise InputError(f"data file {p}, line {lineno}: expected a JSON object, got {type(row).__name__}")
            yield f"line {lineno}", row


def _parquet_rows(p: Path) -> Iterator[Row]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(p, use_threads=False)  # see influence/offline.py _decode: the pool can abort at exit
    except Exception as e:  # pyarrow raises several types for a corrupt/non-parquet file
        raise InputError(f"data file {p}: cannot read as parquet ({e})") from None
    for i, row in enumerate(table.to_pylist()):
        yield f"row {i}", row


def _hf_rows(p: Path) -> Iterator[Row]:
    # Imported lazily: `datasets` is slow to import and only this format needs it.
    import datasets

    try:
        ds = datasets.load_from_disk(str(p))
    except FileNotFoundError:
        raise InputError(f"data file {p}: folder is not a saved HF dataset (expected {ACCEPTED})") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise InputError(f"data file {p}: dataset has no 'train' split (splits: {', '.join(ds)})")
        ds = ds["train"]
    for i, row in enumerate(ds):
        yield f"row {i}", row
