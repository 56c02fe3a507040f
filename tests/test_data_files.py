"""`load_file_source`: JSONL, Parquet and saved HF dataset folders become
Prompts; every bad input is an InputError that says where the problem is."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cropi.data.files import load_file_source
from cropi.data.types import Prompt
from cropi.errors import InputError

ROWS = [
    {"prompt": "What is 2+2?", "answer": "4"},
    {"prompt": "What is 3*3?", "answer": 9},
]


def write_jsonl(path: Path, rows: list[dict], blank_lines: bool = False) -> Path:
    sep = "\n\n" if blank_lines else "\n"
    path.write_text(sep.join(json.dumps(r) for r in rows) + "\n")
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def load(path: Path, prompt: str = "prompt", answer: str = "answer", id_field: str | None = None) -> list[Prompt]:
    return load_file_source(str(path), prompt, answer, id_field, "math")


# --- loading -----------------------------------------------------------------


def test_jsonl_default_fields(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", ROWS, blank_lines=True)
    prompts = load(path)
    assert prompts == [
        Prompt(id="000000", text="What is 2+2?", answer="4", verifier="math"),
        Prompt(id="000001", text="What is 3*3?", answer="9", verifier="math"),
    ]
    # The whole row stays with the prompt (a custom reward function gets it), with where it was read.
    assert [p.meta for p in prompts] == [{"row": ROWS[0], "where": "line 1", "file": str(path)},
                                         {"row": ROWS[1], "where": "line 3", "file": str(path)}]


def test_jsonl_custom_fields_and_id_field(tmp_path: Path) -> None:
    rows = [{"question": "q1", "solution": "#### 7", "uid": 17}, {"question": "q2", "solution": "1", "uid": "b"}]
    prompts = load(write_jsonl(tmp_path / "d.jsonl", rows), "question", "solution", "uid")
    assert [(p.id, p.text, p.answer) for p in prompts] == [("17", "q1", "#### 7"), ("b", "q2", "1")]


def test_parquet(tmp_path: Path) -> None:
    rows = [{"problem": "p", "gold": 1.5, "key": "k1"}, {"problem": "q", "gold": 2.0, "key": "k2"}]
    prompts = load(write_parquet(tmp_path / "d.parquet", rows), "problem", "gold", "key")
    assert [(p.id, p.text, p.answer, p.verifier) for p in prompts] == [
        ("k1", "p", "1.5", "math"),
        ("k2", "q", "2.0", "math"),
    ]
    default = load(write_parquet(tmp_path / "e.parquet", [{"prompt": "a", "answer": 3}, {"prompt": "b", "answer": 4}]))
    assert [(p.id, p.answer) for p in default] == [("000000", "3"), ("000001", "4")]


def test_hf_folder(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "ds"
    datasets.Dataset.from_list([{"prompt": "a", "answer": "1"}, {"prompt": "b", "answer": "2"}]).save_to_disk(str(folder))
    prompts = load(folder)
    assert [(p.id, p.text, p.answer) for p in prompts] == [("000000", "a", "1"), ("000001", "b", "2")]


def test_hf_dataset_dict_takes_train_split(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "dd"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list([{"q": "train q", "a": "1"}]),
            "test": datasets.Dataset.from_list([{"q": "test q", "a": "2"}]),
        }
    ).save_to_disk(str(folder))
    assert [p.text for p in load(folder, "q", "a")] == ["train q"]


def test_hf_dataset_dict_without_train_lists_splits(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "dd"
    datasets.DatasetDict({"test": datasets.Dataset.from_list(ROWS[:1])}).save_to_disk(str(folder))
    with pytest.raises(InputError, match=r"no 'train' split \(splits: test\)"):
        load(folder)


# --- errors ------------------------------------------------------------------


def test_jsonl_missing_field_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    # Line 3 (1-based) lacks the answer; a blank line must not shift the count.
    path.write_text('{"prompt": "a", "answer": "1"}\n\n{"prompt": "b"}\n')
    with pytest.raises(InputError) as e:
        load(path)
    assert str(e.value) == f"data file {path}, line 3: missing field 'answer'"


def test_parquet_missing_field_names_row(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "d.parquet", [{"prompt": "a", "answer": "1"}, {"prompt": None, "answer": "2"}])
    with pytest.raises(InputError) as e:
        load(path)
    assert str(e.value) == f"data file {path}, row 1: field 'prompt' is null"


def test_missing_column_names_field(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "d.parquet", [{"prompt": "a", "answer": "1"}])
    with pytest.raises(InputError, match=r"d\.parquet, row 0: missing field 'question'"):
        load(path, prompt="question")


def test_malformed_json_names_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "answer": "1"}\n{"prompt": "b", \n')
    with pytest.raises(InputError, match=r"bad\.jsonl, line 2: malformed JSON"):
        load(path)


def test_null_answer(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "answer": None}])
    with pytest.raises(InputError, match=r"d\.jsonl, line 1: field 'answer' is null"):
        load(path)


def test_non_string_prompt(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": ["a"], "answer": "1"}])
    with pytest.raises(InputError, match=r"line 1: field 'prompt' must be a string"):
        load(path)


def test_unknown_extension(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("prompt,answer\na,1\n")
    with pytest.raises(InputError, match=r"d\.csv.*'\.csv'.*\.jsonl.*\.parquet.*save_to_disk"):
        load(path)


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"nope\.jsonl: not found"):
        load(tmp_path / "nope.jsonl")


def test_folder_that_is_not_a_dataset(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not a saved HF dataset"):
        load(tmp_path)


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    with pytest.raises(InputError, match=r"empty\.jsonl: no rows"):
        load(path)


def test_duplicate_ids(tmp_path: Path) -> None:
    rows = [{"prompt": "a", "answer": "1", "id": 5}, {"prompt": "b", "answer": "2", "id": "5"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    # The message names the field and both rows, never the id itself (ids may be secrets).
    with pytest.raises(InputError, match=r"line 2: field 'id' repeats the id of line 1 \(ids must be unique\)"):
        load(path, id_field="id")


def test_missing_id_field(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    with pytest.raises(InputError, match=r"line 1: missing field 'uid'"):
        load(path, id_field="uid")
