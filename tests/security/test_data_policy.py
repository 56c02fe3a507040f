"""Issue H, part 3: the data-source policy (cropi/data/access.py).

A job spec names its data by path, and anyone holding an API token submits specs. So a service
reads a local path only under its data roots (CROPI_DATA_ROOTS; none configured: none read),
judged with symlinks and `..` resolved and before the path is looked at, in words that do not
depend on whether it exists; it reads `s3://bucket/key` only from its own S3 store's bucket;
parsing a spec runs no user code; and no error message repeats a row's value. `cropi run`
(no policy) still reads whatever its user can read.
"""

from __future__ import annotations

import io
import itertools
import json
import os
from pathlib import Path

import pytest

from cropi.data import files
from cropi.data.access import EMBEDDED, POLICY_ENV, ROOTS_ENV, DataAccess, data_access, set_data_access
from cropi.data.rewards import RewardError, reward
from cropi.data.sources import load_job_data, load_source
from cropi.errors import InputError
from cropi.spec import DataSource, parse_spec

SECRET = "sk-test-123"
ROWS = [{"prompt": "What is 2+2?", "answer": "4"}, {"prompt": "What is 3*3?", "answer": "9"}]
_buckets = itertools.count()


@pytest.fixture(autouse=True)
def no_policy_left_behind(monkeypatch):
    monkeypatch.delenv(ROOTS_ENV, raising=False)
    monkeypatch.delenv(POLICY_ENV, raising=False)
    yield
    set_data_access(None)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def job(source: str, **pool) -> dict:
    return {"data": {"pool": {"source": source, **pool}}}


def refusal(spec: dict) -> str:
    with pytest.raises(InputError) as e:
        load_job_data(parse_spec(spec))
    return str(e.value)


@pytest.fixture
def layout(tmp_path):
    """A data root holding one dataset, and a folder outside it holding a secret-looking file."""
    root, outside = tmp_path / "data", tmp_path / "outside"
    write_jsonl(root / "train.jsonl", ROWS)
    write_jsonl(outside / "secrets.jsonl", [{"prompt": SECRET, "answer": SECRET}])
    return root, outside


def serve_with_roots(*roots: Path, store=None) -> None:
    set_data_access(DataAccess.for_service(store, roots=os.pathsep.join(map(str, roots))))


# --- local paths in a service ---------------------------------------------------------------


def test_a_path_outside_the_roots_is_refused_in_the_same_words_whether_it_exists_or_not(layout, monkeypatch):
    root, outside = layout
    serve_with_roots(root)
    looked_at = []
    monkeypatch.setattr(files, "_rows", lambda *a, **k: looked_at.append(a))  # reading would start here
    existing = refusal(job(str(outside / "secrets.jsonl")))
    missing = refusal(job(str(outside / "no-such-file.jsonl")))
    assert existing == missing
    assert existing.startswith("data.pool.source: ") and str(root) in existing
    assert "CROPI_DATA_ROOTS" in existing and "controller.dataRoots" in existing
    assert "not found" not in existing and str(outside) not in existing and SECRET not in existing
    assert looked_at == []  # refused before anything looked at the path


def test_dot_dot_cannot_climb_out_of_a_root(layout):
    root, _ = layout
    serve_with_roots(root)
    message = refusal(job(f"{root}/../outside/secrets.jsonl"))
    assert message.startswith("data.pool.source: a local path must lie under the service's data roots")


def test_a_symlink_inside_a_root_cannot_lead_outside_it(layout):
    root, outside = layout
    (root / "innocent.jsonl").symlink_to(outside / "secrets.jsonl")
    (root / "shared").symlink_to(outside, target_is_directory=True)
    serve_with_roots(root)
    for source in (root / "innocent.jsonl", root / "shared" / "secrets.jsonl"):
        assert refusal(job(str(source))).startswith("data.pool.source: a local path must lie under")


def test_a_dataset_folder_under_a_root_cannot_link_to_or_name_files_outside_it(layout):
    root, outside = layout
    linked = root / "linked-ds"
    linked.mkdir()
    (linked / "data-00000-of-00001.arrow").symlink_to(outside / "secrets.jsonl")
    named = root / "named-ds"
    named.mkdir()
    (named / "state.json").write_text(json.dumps({"_data_files": [{"filename": "../../outside/x.arrow"}]}))
    serve_with_roots(root)
    for folder in (linked, named):
        message = refusal(job(str(folder)))
        assert "links to or names a file outside itself" in message and SECRET not in message


def test_a_file_under_a_root_is_read_with_roots_from_the_environment(layout, tmp_path, monkeypatch):
    root, _ = layout
    other = tmp_path / "other"
    for separator in (os.pathsep, ","):
        monkeypatch.setenv(ROOTS_ENV, f"{other}{separator} {root}")
        set_data_access(DataAccess.for_service(None))
        assert [p.text for p in load_job_data(parse_spec(job(str(root / "train.jsonl")))).pool] == [
            "What is 2+2?", "What is 3*3?"]


def test_a_root_given_through_a_symlink_still_admits_its_files(layout, tmp_path):
    root, _ = layout
    (tmp_path / "data-link").symlink_to(root, target_is_directory=True)
    serve_with_roots(tmp_path / "data-link")
    assert len(load_job_data(parse_spec(job(str(root / "train.jsonl")))).pool) == 2


def test_a_service_with_no_roots_reads_no_local_path_and_says_how_to_allow_it(layout):
    root, _ = layout
    set_data_access(DataAccess.for_service(None))  # CROPI_DATA_ROOTS unset: deny by default
    message = refusal(job(str(root / "train.jsonl")))
    assert message == ("data.pool.source: this service reads no local paths (no data roots are configured); an "
                       "operator allows folders with CROPI_DATA_ROOTS (Helm: controller.dataRoots)")


def test_evaluation_sets_are_held_to_the_same_roots(layout):
    root, outside = layout
    serve_with_roots(root)
    spec = job(str(root / "train.jsonl"))
    spec["data"]["validation"] = [{"name": "v", "source": str(outside / "secrets.jsonl")}]
    assert refusal(spec).startswith("data.validation[0].source: a local path must lie under")


def test_data_roots_must_be_absolute_folders(monkeypatch):
    monkeypatch.setenv(ROOTS_ENV, "relative/data")
    with pytest.raises(InputError, match="CROPI_DATA_ROOTS: every data root must be an absolute folder"):
        DataAccess.for_service(None)


def test_an_embedded_run_reads_any_path_even_with_roots_in_its_environment(layout, monkeypatch):
    root, outside = layout
    monkeypatch.setenv(ROOTS_ENV, str(root))  # only `cropi serve` turns the policy on
    assert data_access() is EMBEDDED
    pool = load_job_data(parse_spec(job(str(outside / "secrets.jsonl")))).pool
    assert [p.text for p in pool] == [SECRET]


def test_a_services_policy_reaches_the_processes_it_starts(layout, monkeypatch):
    from cropi.executors.ray.cluster import forwarded_env
    from cropi.data import access

    root, outside = layout
    monkeypatch.setenv(ROOTS_ENV, str(root))
    set_data_access(DataAccess.for_service(None))
    assert {POLICY_ENV: "service", ROOTS_ENV: str(root)}.items() <= forwarded_env().items()
    monkeypatch.setattr(access, "_current", None)  # a Ray actor: the environment, not the setting
    assert data_access().roots == (str(root.resolve()),)
    assert refusal(job(str(outside / "secrets.jsonl"))).startswith("data.pool.source: a local path must lie")


# --- s3:// sources ------------------------------------------------------------------------


@pytest.fixture
def s3_store(moto_server):
    from cropi.runtime.s3store import S3Store

    return S3Store(moto_server.endpoint, f"policy-{next(_buckets)}", "testing", "testing", prefix="cropi")


def upload(store, name: str, data: bytes, bucket: str | None = None) -> None:
    # As another tool would (`mc cp`, `aws s3 cp`): no cropi checksum metadata.
    store.client.put_object(bucket or store.bucket, name, io.BytesIO(data), len(data))


def test_an_s3_source_is_read_from_the_stores_own_bucket(s3_store, tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    upload(s3_store, "datasets/train.jsonl", "".join(json.dumps(r) + "\n" for r in ROWS).encode())
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(ROWS), buffer)
    upload(s3_store, "datasets/train.parquet", buffer.getvalue())
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "saved"))
    for path in (tmp_path / "saved").iterdir():
        upload(s3_store, f"datasets/saved/{path.name}", path.read_bytes())
    set_data_access(DataAccess.for_service(s3_store))  # no roots: s3:// needs none
    for key in ("datasets/train.jsonl", "datasets/train.parquet", "datasets/saved", "datasets/saved/"):
        pool = load_job_data(parse_spec(job(f"s3://{s3_store.bucket}/{key}"))).pool
        assert [(p.text, p.answer) for p in pool] == [("What is 2+2?", "4"), ("What is 3*3?", "9")], key
    message = refusal(job(f"s3://{s3_store.bucket}/datasets/absent.jsonl"))
    assert message == f"data file s3://{s3_store.bucket}/datasets/absent.jsonl: not found"


def test_a_service_actor_given_the_store_reads_s3_sources(s3_store):
    upload(s3_store, "d.jsonl", json.dumps(ROWS[0]).encode())
    access = DataAccess.for_service(None).with_store(s3_store)  # a Ray actor: JobCache passes its store
    assert len(load_job_data(parse_spec(job(f"s3://{s3_store.bucket}/d.jsonl")), access=access).pool) == 1


def test_an_s3_source_in_another_bucket_is_refused_naming_the_field(s3_store):
    other = f"policy-other-{next(_buckets)}"
    s3_store.client.make_bucket(other)
    upload(s3_store, "d.jsonl", json.dumps({"prompt": SECRET, "answer": "1"}).encode(), bucket=other)
    set_data_access(DataAccess.for_service(s3_store))
    message = refusal(job(f"s3://{other}/d.jsonl"))
    assert message == (f"data.pool.source: s3:// sources must be in the object store's own bucket "
                       f"(s3://{s3_store.bucket}/...); no other bucket is read")


@pytest.mark.parametrize("key", ["", "/", "a/../d.jsonl", "a//d.jsonl", "./d.jsonl"])
def test_an_s3_source_names_plain_keys(s3_store, key):
    set_data_access(DataAccess.for_service(s3_store))
    assert refusal(job(f"s3://{s3_store.bucket}/{key}")).startswith("data.pool.source: an s3:// source names")


def test_s3_sources_need_a_service_whose_store_is_s3(tmp_path):
    from cropi.runtime.store import LocalStore

    for access in (None, DataAccess.for_service(LocalStore(tmp_path / "store"))):
        set_data_access(access)
        assert refusal(job("s3://bucket/d.jsonl")).startswith(
            "data.pool.source: s3:// sources are read from the cluster's object store")


# --- no row values in messages ------------------------------------------------------------


def test_a_duplicate_id_is_reported_by_file_row_and_field_never_by_its_value(tmp_path):
    path = write_jsonl(tmp_path / "keys.jsonl", [{"prompt": "a", "answer": "1", "api_key": SECRET},
                                                 {"prompt": "b", "answer": "2", "api_key": SECRET}])
    message = refusal(job(str(path), id_field="api_key"))
    assert SECRET not in message
    assert message == f"data file {path}, line 2: field 'api_key' repeats the id of line 1 (ids must be unique)"


@pytest.mark.parametrize("row, expected", [
    ({"prompt": {"text": SECRET}, "answer": "1"}, "line 1: field 'prompt' must be a string or a chat"),
    ({"prompt": "p", "answer": [SECRET]}, "line 1: field 'answer' must be a string or number, got list"),
    ({"prompt": "p", "answer": {"secret": SECRET}}, "line 1: field 'answer' must be a string or number, got dict"),
    ({"prompt": [{"role": SECRET}], "answer": "1"}, "line 1: field 'prompt' must be a string or a chat"),
])
def test_a_bad_row_is_reported_by_file_row_and_field_never_by_its_value(tmp_path, row, expected):
    path = write_jsonl(tmp_path / "bad.jsonl", [row])
    message = refusal(job(str(path)))
    assert SECRET not in message and message.startswith(f"data file {path}, {expected}")


def test_malformed_json_is_reported_without_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(f'{{"prompt": "{SECRET}", "answer": }}\n')
    message = refusal(job(str(path)))
    assert SECRET not in message and message.startswith(f"data file {path}, line 1: malformed JSON")


def test_row_level_errors_after_loading_name_the_row_not_its_id(tmp_path):
    path = write_jsonl(tmp_path / "keys.jsonl", [{"prompt": "a", "answer": "1", "key": SECRET,
                                                  "data_source": SECRET}])
    by_source = DataSource(source=str(path), id_field="key", verifier_by_source={"gsm8k": "math"})
    with pytest.raises(InputError) as e:
        load_source(by_source, "pool", 0, field="data.pool")
    assert SECRET not in str(e.value) and "data.pool.verifier_by_source: line 1 has" in str(e.value)
    reward_file = tmp_path / "score.py"
    reward_file.write_text("def score(response, reference, row):\n    raise ValueError(row['key'])\n")
    prompt = load_source(DataSource(source=str(path), id_field="key", verifier=f"{reward_file}:score"), "pool", 0)[0]
    with pytest.raises(RewardError) as e:
        reward(prompt, "1")
    assert SECRET not in str(e.value) and str(e.value).endswith(f"raised ValueError on data file {path}, line 1")
    prompt = load_source(DataSource(source=str(path), id_field="key"), "pool", 0)[0]
    with pytest.raises(InputError) as e:
        reward(type(prompt)(id=prompt.id, text="a", answer="1", verifier="exact", meta=prompt.meta), "1")
    assert SECRET not in str(e.value) and str(e.value).startswith(f"data file {path}, line 1: unknown verifier")


def test_arith_query_errors_name_the_key_not_the_value():
    for query in (f"digits={SECRET}", f"noise={SECRET}", f"skills={SECRET}"):
        message = refusal(job(f"builtin:arith?{query}"))
        assert SECRET not in message and message.startswith(f"data.pool.source: builtin:arith: {query.split('=')[0]}")


# --- verifier files -----------------------------------------------------------------------


@pytest.fixture
def verifier_file(tmp_path):
    """A reward file that leaves a mark when it is executed."""
    path = tmp_path / "code" / "score.py"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"open({str(tmp_path / 'executed')!r}, 'a').write('x')\n"
                    "def score(response, reference, row):\n    return float(response == reference)\n")
    return path


def test_parsing_a_spec_never_runs_its_verifier_file(tmp_path, verifier_file):
    spec = parse_spec(job("builtin:arith", verifier=f"{verifier_file}:score",
                          verifier_by_source={"default": f"{verifier_file}:score"}))
    assert spec.data.pool.verifier.endswith("score.py:score")
    assert not (tmp_path / "executed").exists()
    prompt = load_job_data(spec).pool[0]  # where the rewards are computed, it runs
    assert reward(prompt, prompt.answer) == 1.0 and (tmp_path / "executed").exists()


def test_parsing_still_refuses_a_missing_verifier_file_or_module_naming_the_field(tmp_path):
    for ref, expected in ((f"{tmp_path}/nope.py:score", "file"), ("no_such_module_xyz:score", "cannot import")):
        with pytest.raises(InputError, match=rf"data\.pool\.verifier: Value error, {expected}"):
            parse_spec(job("builtin:arith", verifier=ref))


def test_a_service_refuses_a_verifier_file_outside_its_roots_at_parse_and_at_load(tmp_path, verifier_file):
    from cropi.userfn import load_function

    serve_with_roots(tmp_path / "elsewhere")
    for ref in (f"{verifier_file}:score", f"{tmp_path}/code/../code/missing.py:score"):
        with pytest.raises(InputError) as e:
            parse_spec(job("builtin:arith", verifier=ref))
        assert "data.pool.verifier: Value error, a local path must lie under the service's data roots" in str(e.value)
        assert "not found" not in str(e.value)
    with pytest.raises(ValueError, match="a local path must lie under"):
        load_function(f"{verifier_file}:score", 3)
    assert not (tmp_path / "executed").exists()
    serve_with_roots(verifier_file.parent)
    assert load_function(f"{verifier_file}:score", 3)("1", "1", {}) == 1.0


# --- the services set the policy ----------------------------------------------------------


def test_the_controller_service_holds_jobs_to_its_data_roots(redis_server, tmp_path, layout, verifier_file):
    from ..services import LocalCluster

    root, outside = layout
    cluster = LocalCluster(redis_server, str(tmp_path / "store"), tmp_path / "logs", env={ROOTS_ENV: str(root)})
    cluster.start("controller")
    try:
        with cluster.client() as c:
            def submit(name: str, **pool) -> object:
                spec = {"name": name, **job(pool.pop("source"), **pool)}
                return c.post("/v1/jobs", json={"spec": json.dumps(spec)})

            refused = submit("outside", source=str(outside / "secrets.jsonl"))
            # Refused at submit (the data is read there, as `cropi run` reads it before it starts).
            assert refused.status_code == 422 and "data.pool.source: a local path" in refused.json()["detail"]
            assert c.get("/v1/jobs/outside").status_code == 404  # nothing stored
            answer = submit("verifier", source="builtin:arith", verifier=f"{verifier_file}:score")
            assert answer.status_code == 422 and "data.pool.verifier" in answer.text
            (root / "score.py").write_text(verifier_file.read_text())  # under the root: taken, not run
            assert submit("rooted", source="builtin:arith", verifier=f"{root}/score.py:score").status_code == 201
            assert cluster.wait_phase("rooted", ("offline", "failed"), timeout_s=60)["phase"] == "offline"
            assert not (tmp_path / "executed").exists()
            assert submit("inside", source=str(root / "train.jsonl")).status_code == 201
            status = cluster.wait_phase("inside", ("offline", "failed"), timeout_s=60)
            assert status["phase"] == "offline", status
    finally:
        cluster.stop_all()
