"""Prompts from real dataset files: JSONL, Parquet, or a folder written by
HF `datasets`' `Dataset.save_to_disk`.

Fields are named by dotted paths into the row (`reward_model.ground_truth`),
so verl-format parquet reads as it is: `prompt` may be a chat (a list of
{role, content} messages), `data_source` and `extra_info` are kept with the
prompt (`meta`), and the whole row goes to a custom reward function.

Every problem with the file is an `InputError` that names the file, the
row (1-based line for JSONL, since that is what an editor shows; 0-based row
index for tabular formats, since that is what `datasets`/pandas show) and
the field, never a row's value. Which paths may be read at all (a service's
data roots, s3:// sources from its object store) is `access.py`'s policy."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cropi.data.access import S3, DataAccess, data_access
from cropi.data.types import Prompt
from cropi.errors import InputError

ACCEPTED = "a .jsonl file, a .parquet file, or a folder saved with datasets' save_to_disk"

# (location label such as "line 3" or "row 0", row dict)
Row = tuple[str, dict[str, Any]]


Chat = list[dict[str, str]]  # [{"role": ..., "content": ...}, ...]


def field_at(row: dict[str, Any], path: str) -> Any:
    """The value at dotted `path` in a row (KeyError naming the first missing part)."""
    value: Any = row
    for depth, part in enumerate(path.split(".")):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(".".join(path.split(".")[: depth + 1]))
        value = value[part]
    return value


def load_file_source(
    path: str, prompt_field: str, answer_field: str, id_field: str | None, verifier: str,
    data_source_field: str = "data_source", field: str = "data.source", access: DataAccess | None = None,
) -> list[Prompt]:
    """Read every row of `path` (a local path, or s3://bucket/key in a service) into a Prompt; see the
    module docstring for formats. `access` (default: this process's) says which paths may be read;
    `field` is the spec path its refusals name."""
    access = access or data_access()
    if path.startswith(S3):
        with tempfile.TemporaryDirectory(prefix="cropi-s3-") as tmp:
            local = access.fetch_s3(path, field, Path(tmp))
            return _prompts(_rows(local, path, confined=True), path, prompt_field, answer_field, id_field,
                            verifier, data_source_field)
    local = access.local_path(path, field)  # before anything looks at the path
    return _prompts(_rows(local, path, confined=access.restricted), path, prompt_field, answer_field, id_field,
                    verifier, data_source_field)


def _rows(p: Path, label: str, confined: bool) -> Iterator[Row]:
    """The rows of the file or folder at `p`, named `label` in messages; `confined`: a folder's files must
    stay inside it (a service's)."""
    if not p.exists():
        raise InputError(f"data file {label}: not found (expected {ACCEPTED})")
    if p.is_dir():
        return _hf_rows(p, label, confined)
    if p.suffix.lower() == ".jsonl":
        return _jsonl_rows(p, label)
    if p.suffix.lower() == ".parquet":
        return _parquet_rows(p, label)
    kind = repr(p.suffix) if p.suffix else "(no extension)"
    raise InputError(f"data file {label}: unsupported file type {kind}; expected {ACCEPTED}")


def _prompts(rows: Iterator[Row], path: str, prompt_field: str, answer_field: str, id_field: str | None,
             verifier: str, data_source_field: str) -> list[Prompt]:
    # Messages name the file, the row and the field, never a row's value (an id may be a secret).
    prompts: list[Prompt] = []
    where_seen: dict[str, str] = {}
    for index, (where, row) in enumerate(rows):
        at = f"data file {path}, {where}"
        text, chat = _prompt(_required(row, prompt_field, at), prompt_field, at)
        answer = _scalar(_required(row, answer_field, at), answer_field, at)
        pid = _scalar(_required(row, id_field, at), id_field, at) if id_field else f"{index:06d}"
        if pid in where_seen:
            raise InputError(f"{at}: field {id_field!r} repeats the id of {where_seen[pid]} (ids must be unique)")
        where_seen[pid] = where
        meta: dict[str, Any] = {"row": row, "where": where, "file": path}
        if chat is not None:
            meta["chat"] = chat
        try:
            meta["data_source"] = _scalar(field_at(row, data_source_field), data_source_field, at)
        except KeyError:
            pass
        prompts.append(Prompt(id=pid, text=text, answer=answer, verifier=verifier, meta=meta))

    if not prompts:
        raise InputError(f"data file {path}: no rows")
    return prompts


def _required(row: dict[str, Any], name: str, at: str) -> Any:
    try:
        value = field_at(row, name)
    except KeyError as missing:
        where = f" ({missing.args[0]!r} is absent)" if missing.args[0] != name else ""
        raise InputError(f"{at}: missing field {name!r}{where}") from None
    if value is None:
        raise InputError(f"{at}: field {name!r} is null")
    return value


def _scalar(value: Any, name: str, at: str) -> str:
    """A string, number or bool as text; never the str() of a dict or list (that scores every response 0)."""
    if isinstance(value, (dict, list, tuple)):
        hint = " (name a field inside it with a dotted path, e.g. reward_model.ground_truth)" if isinstance(
            value, dict) else ""
        raise InputError(f"{at}: field {name!r} must be a string or number, got {type(value).__name__}{hint}")
    return str(value)


def _prompt(value: Any, name: str, at: str) -> tuple[str, Chat | None]:
    """The prompt's text and, for a chat (verl's format), its messages."""
    if isinstance(value, str):
        return value, None
    if isinstance(value, (list, tuple)) and value:
        chat = []
        for i, message in enumerate(value):
            if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                    and isinstance(message.get("content"), str)):
                raise InputError(f"{at}: field {name!r} must be a string or a chat (a list of messages with "
                                 f"string 'role' and 'content'); message {i} is not one")
            chat.append({"role": message["role"], "content": message["content"]})
        # The text without a template: the last user message (what a non-chat template formats).
        users = [m["content"] for m in chat if m["role"] == "user"]
        return (users[-1] if users else chat[-1]["content"]), chat
    raise InputError(f"{at}: field {name!r} must be a string or a chat (a non-empty list of messages), "
                     f"got {type(value).__name__}")


def _jsonl_rows(p: Path, label: str) -> Iterator[Row]:
    try:
        f = p.open(encoding="utf-8")
    except OSError as e:  # the message of `e` names the resolved path; say the one the spec gave
        raise InputError(f"data file {label}: cannot be read ({e.strerror})") from None
    with f:
        lineno = 0
        while True:
            try:
                line = f.readline()
            except (OSError, UnicodeDecodeError) as e:  # neither message may quote the file's bytes
                raise InputError(f"data file {label}, line {lineno + 1}: cannot be read as UTF-8 text "
                                 f"({type(e).__name__})") from None
            if not line:
                return
            lineno += 1
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:  # e.msg says what was expected, not what was there
                raise InputError(f"data file {label}, line {lineno}: malformed JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise InputError(f"data file {label}, line {lineno}: expected a JSON object, "
                                 f"got {type(row).__name__}")
            yield f"line {lineno}", row


def _parquet_rows(p: Path, label: str) -> Iterator[Row]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(p, use_threads=False)  # see influence/offline.py _decode: the pool can abort at exit
    except Exception as e:  # pyarrow raises several types for a corrupt/non-parquet file; only the type is said
        raise InputError(f"data file {label}: cannot read as parquet ({type(e).__name__})") from None
    for i, row in enumerate(table.to_pylist()):
        yield f"row {i}", row


def _hf_rows(p: Path, label: str, confined: bool) -> Iterator[Row]:
    # Imported lazily: `datasets` is slow to import and only this format needs it.
    import datasets

    if confined:
        _confine(p, label)
    try:
        ds = datasets.load_from_disk(str(p))
    except FileNotFoundError:
        raise InputError(f"data file {label}: folder is not a saved HF dataset (expected {ACCEPTED})") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise InputError(f"data file {label}: dataset has no 'train' split (splits: {', '.join(ds)})")
        ds = ds["train"]
    for i, row in enumerate(ds):
        yield f"row {i}", row


def _confine(folder: Path, label: str) -> None:
    """Every file a saved dataset folder holds or names (state.json's data files, dataset_dict.json's
    splits) stays inside it once symlinks and '..' are resolved, so the folder cannot lead a service's
    read elsewhere; and its path is never read as a URL (fsspec chains on '::')."""
    root = os.path.realpath(folder)
    escapes = f"data file {label}: the dataset folder links to or names a file outside itself"
    if "::" in root:
        raise InputError(f"data file {label}: a dataset folder's path may not contain '::'")

    def inside(path: str) -> bool:
        real = os.path.realpath(path)
        return real == root or real.startswith(root + os.sep)

    for dirpath, dirnames, filenames in os.walk(root):  # symlinked folders are checked, not entered
        for name in (*dirnames, *filenames):
            if not inside(os.path.join(dirpath, name)):
                raise InputError(escapes)
        for name, key in (("state.json", "_data_files"), ("dataset_dict.json", "splits")):
            if name not in filenames:
                continue
            try:
                named = json.loads(Path(dirpath, name).read_text(encoding="utf-8")).get(key) or []
            except (OSError, ValueError, AttributeError):
                continue  # `datasets` says what is wrong with it
            for item in named:
                target = item.get("filename") if isinstance(item, dict) else item
                if not isinstance(target, str) or not inside(os.path.join(dirpath, target)):
                    raise InputError(escapes)
