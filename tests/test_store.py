"""The local-folder object store: atomic, checksummed, validated keys."""

import pytest

from cropi.errors import InputError
from cropi.runtime.store import ChecksumError, LocalStore


def test_put_get_list_exists(tmp_path):
    store = LocalStore(tmp_path)
    store.put("jobs/a/spec.yaml", b"x: 1\n")
    store.put("jobs/a/offline/pool/part-00000.parquet", b"\x00\x01")
    assert store.get("jobs/a/spec.yaml") == b"x: 1\n"
    assert store.exists("jobs/a/spec.yaml") and not store.exists("jobs/b/spec.yaml")
    assert store.list("jobs/a/") == ["jobs/a/offline/pool/part-00000.parquet", "jobs/a/spec.yaml"]


def test_rewriting_a_key_replaces_it_whole(tmp_path):
    store = LocalStore(tmp_path)
    store.put("k", b"old")
    store.put("k", b"new")
    assert store.get("k") == b"new"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


def test_corruption_is_detected_on_read(tmp_path):
    store = LocalStore(tmp_path)
    store.put("jobs/a/x.bin", b"payload")
    (tmp_path / "jobs/a/x.bin").write_bytes(b"payloaD")
    with pytest.raises(ChecksumError, match="jobs/a/x.bin"):
        store.get("jobs/a/x.bin")


def test_an_object_without_its_checksum_counts_as_absent(tmp_path):
    store = LocalStore(tmp_path)
    store.put("a/b", b"1")
    (tmp_path / "a/b.sha256").unlink()  # a crash between the two writes
    assert not store.exists("a/b") and store.list("a") == []


@pytest.mark.parametrize("key", ["", "/abs", "a/../b", "a//b", "a/./b", "a/", "a/b.sha256", "a b", "..", "a\\b"])
def test_bad_keys_are_rejected_and_nothing_is_written(tmp_path, key):
    store = LocalStore(tmp_path / "s")
    with pytest.raises(InputError, match="invalid storage key"):
        store.put(key, b"x")
    assert list((tmp_path / "s").iterdir()) == []
