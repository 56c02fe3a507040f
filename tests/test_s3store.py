"""The S3 backend against a real S3 endpoint (moto's server on loopback):
same behaviour as the local folder, checksums verified, outages survived."""

import itertools
import threading
import time

import pytest

from cropi.errors import InputError
from cropi.runtime.s3store import S3Store
from cropi.runtime.store import ChecksumError, LocalStore

from .netutil import TcpProxy

_bucket_ids = itertools.count()


def s3(endpoint: str, **kwargs) -> S3Store:
    return S3Store(endpoint, f"test-{next(_bucket_ids)}", "testing", "testing", secure=False, **kwargs)


@pytest.fixture
def store(moto_server):
    return s3(moto_server.endpoint, prefix="cropi")


@pytest.fixture(params=["local", "s3"])
def any_store(request, tmp_path, moto_server):
    return LocalStore(tmp_path / "store") if request.param == "local" else s3(moto_server.endpoint)


def test_both_backends_put_get_list_exists_alike(any_store):
    any_store.put("jobs/a/stages/0/selection.json", b'{"k": 1}')
    any_store.put("jobs/a/offline/pool/part-00000.parquet", b"\x00" * 1000)
    any_store.put("jobs/b/spec.yaml", b"name: b")
    assert any_store.get("jobs/a/stages/0/selection.json") == b'{"k": 1}'
    assert any_store.exists("jobs/b/spec.yaml") and not any_store.exists("jobs/b/nope")
    assert any_store.list("jobs/a/") == ["jobs/a/offline/pool/part-00000.parquet", "jobs/a/stages/0/selection.json"]
    with pytest.raises(FileNotFoundError, match="jobs/a/missing"):
        any_store.get("jobs/a/missing")


@pytest.mark.parametrize("key", ["../etc/passwd", "/abs/key", "jobs/../x", "jobs//x", "jobs/x/", "a/b c", "x.sha256"])
def test_both_backends_refuse_bad_keys_and_store_nothing(any_store, key):
    any_store.put("jobs/keep", b"1")
    with pytest.raises(InputError, match="invalid storage key"):
        any_store.put(key, b"data")
    assert any_store.list("") == ["jobs/keep"]


def test_overwriting_a_key_replaces_it_whole(store):
    store.put("jobs/a/x", b"first")
    store.put("jobs/a/x", b"second, longer")
    assert store.get("jobs/a/x") == b"second, longer"


def test_a_corrupted_object_is_detected_on_read(store):
    store.put("jobs/a/x", b"good bytes")
    # Bypass the store: overwrite the object with different bytes, keeping the old checksum header.
    import io

    stat = store.client.stat_object(store.bucket, "cropi/jobs/a/x")
    store.client.put_object(store.bucket, "cropi/jobs/a/x", io.BytesIO(b"bad bytes!"), 10,
                            metadata={"sha256": stat.metadata["x-amz-meta-sha256"]})
    with pytest.raises(ChecksumError, match="jobs/a/x"):
        store.get("jobs/a/x")


def test_an_object_written_by_another_tool_without_checksum_is_refused(store):
    import io

    store.client.put_object(store.bucket, "cropi/jobs/a/foreign", io.BytesIO(b"abc"), 3)
    with pytest.raises(ChecksumError, match="no checksum"):
        store.get("jobs/a/foreign")


def test_the_prefix_keeps_jobs_apart_in_one_bucket(moto_server):
    a = S3Store(moto_server.endpoint, "shared-bucket", "testing", "testing", prefix="team-a")
    b = S3Store(moto_server.endpoint, "shared-bucket", "testing", "testing", prefix="team-b")
    a.put("jobs/x/spec.yaml", b"a")
    b.put("jobs/x/spec.yaml", b"b")
    assert (a.get("jobs/x/spec.yaml"), b.get("jobs/x/spec.yaml")) == (b"a", b"b")
    assert a.list("jobs/") == ["jobs/x/spec.yaml"]


def test_operations_wait_out_a_ten_second_outage(moto_server):
    proxy = TcpProxy(moto_server.port)
    store = s3(proxy.endpoint, retry_deadline_s=30)
    store.put("jobs/a/before", b"1")
    proxy.cut()
    threading.Timer(10.0, proxy.restore).start()
    start = time.monotonic()
    store.put("jobs/a/during", b"2")  # blocks, retrying, until the endpoint is back
    assert time.monotonic() - start >= 9.5
    assert store.get("jobs/a/during") == b"2" and store.get("jobs/a/before") == b"1"


def test_an_outage_longer_than_the_deadline_is_a_clear_error(moto_server):
    proxy = TcpProxy(moto_server.port)
    store = s3(proxy.endpoint, retry_deadline_s=1.0)
    proxy.cut()
    with pytest.raises(ConnectionError, match="unreachable for 1 s"):
        store.get("jobs/a/x")
    proxy.restore()
