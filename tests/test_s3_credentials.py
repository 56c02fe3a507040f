"""Where the S3 store's credentials come from (cropi/runtime/s3creds.py), each way for real against
moto's server on loopback: static keys, the AWS environment variables, a web identity exchanged with
STS (AssumeRoleWithWebIdentity, IRSA's way), the instance metadata service; and a clear error when
no source has any.

moto's S3 accepts any key, so a round trip shows the store signs with what the source gave; the
STS and metadata tests check that the keys used are the ones moto issued."""

from __future__ import annotations

import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest

from cropi.errors import InputError
from cropi.runtime.config import open_store
from cropi.runtime.s3creds import default_chain

from .netutil import free_port


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No credentials anywhere but what the test sets: no AWS_*/CROPI_S3_* variables, no ~/.aws."""
    import os

    for name in list(os.environ):
        if name.startswith(("AWS_", "CROPI_S3_", "CROPI_STORE")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    return monkeypatch


_ids = iter(range(10**6))


def _round_trip(moto_server, env) -> object:
    env.setenv("CROPI_S3_ENDPOINT", moto_server.endpoint)
    store = open_store(f"s3://creds-{next(_ids)}/cropi")
    store.put("jobs/a/spec.yaml", b"name: a")
    assert store.get("jobs/a/spec.yaml") == b"name: a" and store.list("jobs/") == ["jobs/a/spec.yaml"]
    return store


def test_static_keys_still_sign_every_request(moto_server, clean_env):
    clean_env.setenv("CROPI_S3_ACCESS_KEY", "static-key")
    clean_env.setenv("CROPI_S3_SECRET_KEY", "static-secret")
    store = _round_trip(moto_server, clean_env)
    assert store.credentials is None  # no chain: the keys as given


def test_half_a_static_key_is_refused(clean_env):
    clean_env.setenv("CROPI_S3_ENDPOINT", "127.0.0.1:9")
    clean_env.setenv("CROPI_S3_ACCESS_KEY", "only-the-access-key")
    with pytest.raises(InputError, match="both CROPI_S3_ACCESS_KEY and CROPI_S3_SECRET_KEY, or neither"):
        open_store("s3://b/p")


def test_without_static_keys_the_aws_environment_variables_are_used(moto_server, clean_env):
    clean_env.setenv("AWS_ACCESS_KEY_ID", "env-key")
    clean_env.setenv("AWS_SECRET_ACCESS_KEY", "env-secret")
    clean_env.setenv("AWS_SESSION_TOKEN", "env-session")
    store = _round_trip(moto_server, clean_env)
    assert store.credentials.source == "environment AWS_ACCESS_KEY_ID"
    creds = store.credentials.retrieve()
    assert (creds.access_key, creds.session_token) == ("env-key", "env-session")


class _StsRelay:
    """The STS endpoint the pods would call, in front of moto. minio's client sends
    AssumeRoleWithWebIdentity (an unsigned call) as a query string; moto's server routes unsigned
    calls by their form body only, so this relay moves the query into the body, unchanged, and
    records what was asked."""

    def __init__(self, moto_port: int):
        self.calls: list[dict[str, list[str]]] = []
        relay = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's name)
                query = urlsplit(self.path).query
                relay.calls.append(parse_qs(query))
                request = urllib.request.Request(f"http://127.0.0.1:{moto_port}/", data=query.encode(), method="POST",
                                                 headers={"Content-Type": "application/x-www-form-urlencoded"})
                with urllib.request.urlopen(request, timeout=10) as answer:
                    status, body = answer.status, answer.read()
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


def test_a_web_identity_token_is_exchanged_with_sts_for_the_role(moto_server, clean_env, tmp_path):
    """IRSA: the pod identity webhook sets AWS_ROLE_ARN and AWS_WEB_IDENTITY_TOKEN_FILE (a projected
    service account token); the store trades the token for temporary keys of the role."""
    token = tmp_path / "token"
    token.write_text("eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzeXN0ZW06c2VydmljZWFjY291bnQ6bWw6Y3JvcGkifQ.sig")
    relay = _StsRelay(moto_server.port)
    try:
        clean_env.setenv("AWS_WEB_IDENTITY_TOKEN_FILE", str(token))
        clean_env.setenv("AWS_ROLE_ARN", "arn:aws:iam::123456789012:role/cropi-store")
        clean_env.setenv("AWS_ROLE_SESSION_NAME", "cropi-test")
        clean_env.setenv("AWS_ENDPOINT_URL_STS", relay.url)
        store = _round_trip(moto_server, clean_env)
        again = _round_trip(moto_server, clean_env)  # a second store of the process: the same credentials
    finally:
        relay.stop()
    assert store.credentials.source == "web identity AWS_WEB_IDENTITY_TOKEN_FILE"
    assert again.credentials is store.credentials
    (call,) = relay.calls  # one exchange with STS, until the credentials near their expiry
    assert call["Action"] == ["AssumeRoleWithWebIdentity"]
    assert call["RoleArn"] == ["arn:aws:iam::123456789012:role/cropi-store"]
    assert call["WebIdentityToken"] == [token.read_text()] and call["RoleSessionName"] == ["cropi-test"]
    creds = store.credentials.retrieve()  # moto's issued keys, with a session token and an expiry
    assert creds.access_key.startswith("ASIA") and creds.session_token and creds.expiration


def test_the_web_identity_provider_defaults_to_the_regional_sts_endpoint(clean_env, tmp_path):
    token = tmp_path / "token"
    token.write_text("t")
    clean_env.setenv("AWS_WEB_IDENTITY_TOKEN_FILE", str(token))
    clean_env.setenv("AWS_ROLE_ARN", "arn:aws:iam::123456789012:role/r")
    clean_env.setenv("AWS_REGION", "eu-west-1")
    chain = default_chain()
    names = [name for name, _ in chain.sources]
    assert names == ["environment AWS_ACCESS_KEY_ID", "web identity AWS_WEB_IDENTITY_TOKEN_FILE",
                     "shared credentials file"]
    provider = chain.sources[1][1]
    assert provider._custom_endpoint is None and provider._aws_region == "eu-west-1"  # https://sts.eu-west-1...
    assert (provider._identity_file, provider._role_arn) == (str(token), "arn:aws:iam::123456789012:role/r")


def test_an_instance_role_comes_from_the_metadata_service(moto_server, clean_env):
    # moto's server answers the EC2 metadata paths (/latest/api/token, /latest/meta-data/iam/...).
    clean_env.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", f"http://{moto_server.endpoint}")
    store = _round_trip(moto_server, clean_env)
    assert store.credentials.source == "instance metadata"
    assert store.credentials.retrieve().expiration


def test_the_shared_credentials_file_is_read(moto_server, clean_env, tmp_path):
    (tmp_path / "credentials").write_text("[ml]\naws_access_key_id = file-key\naws_secret_access_key = file-secret\n")
    clean_env.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    clean_env.setenv("AWS_PROFILE", "ml")
    clean_env.setenv("AWS_EC2_METADATA_DISABLED", "true")
    store = _round_trip(moto_server, clean_env)
    assert store.credentials.retrieve().access_key == "file-key"


def test_no_source_at_all_is_an_input_error_naming_each_source_soon(moto_server, clean_env):
    clean_env.setenv("CROPI_S3_ENDPOINT", moto_server.endpoint)
    clean_env.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nothing listens
    start = time.monotonic()
    with pytest.raises(InputError) as err:
        open_store("s3://creds-none/cropi")
    assert time.monotonic() - start < 15
    message = str(err.value)
    for needle in ("environment AWS_ACCESS_KEY_ID", "shared credentials file", "instance metadata",
                   "CROPI_S3_ACCESS_KEY", "AWS_WEB_IDENTITY_TOKEN_FILE"):
        assert needle in message, message
