"""Issue H: the bad-input table (bad_input_cases.py), each case through both `cropi run` and `cropi submit`.

The standard: bad input gets one clear message naming what is wrong (field path, file, row, line)
and exit code 2; nothing already stored is lost or corrupted; no message echoes a data value.

Every case is run
  (a) as `cropi run CASE.yaml --out DIR`, in-process through the installed command's own entry
      (`run_app` on services.cli's app, sys.exit caught): its exit code, the message names the
      case's `names` and never its secret, no traceback, and DIR is not created;
  (b) as `cropi submit CASE.yaml --controller URL`, in-process the same way, against the controller
      app served on loopback (a real redis-server, a LocalStore): the same, and the controller's
      Redis (every key, dumped) and store (every file) are byte for byte as they were after a good
      job was submitted before the bad cases;
  (c) as its raw text POSTed to /v1/jobs with the bearer token, since `cropi submit` refuses most
      cases itself before sending: the case's HTTP status (422 unless said), naming `api_names`
      (default `names`), never the secret, and again nothing stored.

docs/bad-input.md is the table: `python -m tests.security.test_bad_input_table --markdown`.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest

from .bad_input_cases import CASES, DOC, fill, markdown, spec_bytes, write_data_files

TOKEN = "bad-input-table-token"
GOOD = "good-job"


class Served:
    """The controller app on loopback, its Redis and its store; what they held after the good job."""

    def __init__(self, url: str, redis, store_root: Path):
        self.url, self.r, self.store_root = url, redis, store_root
        self.baseline = self.snapshot()

    def snapshot(self) -> tuple[dict, dict]:
        keys = {k: self.r.dump(k) for k in sorted(self.r.keys("*"))}
        files = {str(p.relative_to(self.store_root)): p.read_bytes()
                 for p in sorted(self.store_root.rglob("*")) if p.is_file()}
        return keys, files

    def assert_unchanged(self) -> None:
        keys, files = self.snapshot()
        assert sorted(keys) == sorted(self.baseline[0]), "Redis keys changed"
        assert keys == self.baseline[0], "a Redis value changed"
        assert files == self.baseline[1], "the store changed"

    def job_names(self) -> list[str]:
        from cropi.runtime.jobs import JobRegistry

        return JobRegistry(self.r).names()

    def post_raw(self, raw: bytes) -> tuple[int, str]:
        import httpx

        try:
            body = json.dumps({"spec": raw.decode("utf-8")}).encode()
        except UnicodeDecodeError:  # sent as it is: a JSON body that is not UTF-8
            body = json.dumps({"spec": raw.decode("latin-1")}, ensure_ascii=False).encode("latin-1")
        r = httpx.post(f"{self.url}/v1/jobs", content=body, timeout=60,
                       headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
        detail = r.json()["detail"]
        return r.status_code, detail if isinstance(detail, str) else json.dumps(detail)


@contextmanager
def served_controller():
    from cropi.client import ControllerClient
    from cropi.runtime.jobs import JobRegistry
    from cropi.runtime.queue import TaskBus
    from cropi.runtime.redis_server import RedisServer
    from cropi.runtime.store import LocalStore
    from cropi.spec import parse_spec
    from services.controller.api import create_app

    from ..controller_http import serve_app
    from ..jobs import tiny_job

    # As conftest's redis_server fixture, for the whole module (a short path: unix socket limits).
    server = RedisServer(Path(tempfile.mkdtemp(prefix="cropi-redis-")))
    server.start()
    store_root = Path(tempfile.mkdtemp(prefix="cropi-bad-input-store-"))
    try:
        r = server.client()
        app = create_app(TaskBus(r), JobRegistry(r), LocalStore(store_root), TOKEN, run_loop=False)
        with serve_app(app) as url:
            st = ControllerClient(url, TOKEN).submit(parse_spec(tiny_job(name=GOOD)).to_yaml())
            assert st["name"] == GOOD and st["phase"] == "queued"
            assert (store_root / "jobs" / GOOD / "spec.yaml").is_file()
            yield Served(url, r, store_root)
    finally:
        server.stop()
        shutil.rmtree(server.data_dir, ignore_errors=True)
        shutil.rmtree(store_root, ignore_errors=True)


def cli(capsys, monkeypatch, *args: str) -> tuple[int, str]:
    """`cropi ARGS` in this process, through the installed command's entry: (exit code, its output)."""
    from cropi.cli import run_app
    from services.cli import app

    monkeypatch.setattr(sys, "argv", ["cropi", *args])
    capsys.readouterr()
    try:
        run_app(app)
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    out, err = capsys.readouterr()
    return code, out + err


# ------------------------------------------------------------------ the tests
@pytest.fixture(scope="module")
def data_dir():
    folder = Path(tempfile.mkdtemp(prefix="cropi-bad-input-"))
    write_data_files(folder)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def controller(tiny_model):
    with served_controller() as served:
        yield served


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_refused_by_run_and_submit(case, controller, data_dir, tmp_path, capsys, monkeypatch):
    spec_file = tmp_path / "case.yaml"
    spec_file.write_bytes(spec_bytes(case, str(data_dir)))
    names = fill(case.names, data_dir, spec_file)

    def refused(code: int, message: str, expected_code: int) -> None:
        assert code == expected_code, message
        assert names in message, message
        assert "Traceback" not in message, message
        assert case.secret is None or case.secret not in message, message

    # (a) cropi run
    out = tmp_path / "out" / "run"
    refused(*cli(capsys, monkeypatch, "run", str(spec_file), "--out", str(out)), case.run_exit)
    assert not (tmp_path / "out").exists()
    # (b) cropi submit
    monkeypatch.setenv("CROPI_TOKEN", TOKEN)
    refused(*cli(capsys, monkeypatch, "submit", str(spec_file), "--controller", controller.url), case.submit_exit)
    controller.assert_unchanged()
    # (c) the raw text, to the API
    status, detail = controller.post_raw(spec_file.read_bytes())
    assert status == case.status, detail
    assert fill(case.api_names or case.names, data_dir, "request body 'spec'") in detail, detail
    assert case.secret is None or case.secret not in detail, detail
    controller.assert_unchanged()


def test_the_table_has_at_least_forty_distinct_cases():
    assert len(CASES) >= 40
    assert len({c.id for c in CASES}) == len(CASES)
    assert len({spec_bytes(c) for c in CASES}) == len(CASES)


def test_the_good_job_is_untouched_after_every_bad_case(controller):
    from cropi.spec import parse_spec

    from ..jobs import tiny_job

    controller.assert_unchanged()
    assert controller.job_names() == [GOOD]
    stored = (controller.store_root / "jobs" / GOOD / "spec.yaml").read_text()
    assert stored == parse_spec(tiny_job(name=GOOD)).to_yaml()
    assert [p.parent.name for p in (controller.store_root / "jobs").glob("*/spec.yaml")] == [GOOD]


def test_docs_bad_input_md_is_the_table():
    assert DOC.is_file() and DOC.read_text() == markdown(), (
        "docs/bad-input.md is out of date: "
        "python -m tests.security.test_bad_input_table --markdown > docs/bad-input.md")


if __name__ == "__main__" and "--markdown" in sys.argv:
    sys.stdout.write(markdown())
