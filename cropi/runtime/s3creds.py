"""Where the S3 store's credentials come from when no static keys are given: the AWS SDKs' default
chain, in their order, on minio's credential providers.

1. the environment: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_SESSION_TOKEN;
2. a web identity (IRSA on EKS): AWS_WEB_IDENTITY_TOKEN_FILE and AWS_ROLE_ARN, exchanged with STS
   (AssumeRoleWithWebIdentity) at AWS_ENDPOINT_URL_STS, else https://sts.<AWS_REGION>.amazonaws.com;
3. the shared credentials file (AWS_SHARED_CREDENTIALS_FILE or ~/.aws/credentials, AWS_PROFILE);
4. a container endpoint (EKS Pod Identity, ECS): AWS_CONTAINER_CREDENTIALS_FULL_URI or _RELATIVE_URI;
5. the instance metadata service (an EC2 instance role) at AWS_EC2_METADATA_SERVICE_ENDPOINT, else
   http://169.254.169.254; AWS_EC2_METADATA_DISABLED=true skips it.

Temporary credentials (2, 4, 5) are fetched again shortly before they expire, the token file read
anew each time (the kubelet rotates it). A source that is not there (no variable, no file, no
metadata service) is skipped; an STS or container endpoint that does not answer is an outage, and
the store's backoff retries it.
"""

from __future__ import annotations

import os
import threading

import urllib3
from minio.credentials import Credentials
from minio.credentials.providers import AWSConfigProvider, EnvAWSProvider, IamAwsProvider, Provider


def _http(connect_s: float, read_s: float, retries: int) -> urllib3.PoolManager:
    return urllib3.PoolManager(timeout=urllib3.Timeout(connect=connect_s, read=read_s),
                               retries=urllib3.Retry(total=retries, backoff_factor=0.2,
                                                     status_forcelist=[500, 502, 503, 504]))


class _InstanceMetadata(Provider):
    """The metadata service, where there may be none: not reachable means not there (a ValueError,
    the next source), never a wait of minutes."""

    def __init__(self) -> None:
        self._inner = IamAwsProvider(custom_endpoint=os.environ.get("AWS_EC2_METADATA_SERVICE_ENDPOINT"),
                                     http_client=_http(1.0, 2.0, 1))

    def retrieve(self) -> Credentials:
        try:
            return self._inner.retrieve()
        except urllib3.exceptions.HTTPError as err:
            raise ValueError(f"no instance metadata service: {err}") from err


class CredentialChain(Provider):
    """The first source that yields credentials, kept until they expire. When none does, the
    ValueError names what each source answered."""

    def __init__(self, sources: list[tuple[str, Provider]]):
        self.sources = sources
        self.source: str | None = None  # the name of the source in use
        self._credentials: Credentials | None = None

    def retrieve(self) -> Credentials:
        if self._credentials and not self._credentials.is_expired():
            return self._credentials
        reasons = []
        for name, provider in self.sources:
            try:
                self._credentials = provider.retrieve()
            except ValueError as err:
                reasons.append(f"{name}: {err}")
                continue
            self.source = name
            return self._credentials
        raise ValueError("no S3 credentials found (" + "; ".join(reasons) + ")")


def default_chain() -> CredentialChain:
    """The chain above, read from the environment now (build it where the store is opened)."""
    env = os.environ
    sources: list[tuple[str, Provider]] = [("environment AWS_ACCESS_KEY_ID", EnvAWSProvider())]
    if env.get("AWS_WEB_IDENTITY_TOKEN_FILE"):
        sources.append(("web identity AWS_WEB_IDENTITY_TOKEN_FILE", IamAwsProvider(
            custom_endpoint=env.get("AWS_ENDPOINT_URL_STS") or env.get("AWS_ENDPOINT_URL") or None,
            http_client=_http(5.0, 30.0, 3))))
    sources.append(("shared credentials file", AWSConfigProvider()))
    if env.get("AWS_CONTAINER_CREDENTIALS_FULL_URI") or env.get("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI"):
        # IamAwsProvider prefers a web identity when both are set; the web identity came first above anyway.
        sources.append(("container credentials endpoint", IamAwsProvider(http_client=_http(5.0, 30.0, 3))))
    elif env.get("AWS_EC2_METADATA_DISABLED", "").lower() != "true" and not env.get("AWS_WEB_IDENTITY_TOKEN_FILE"):
        sources.append(("instance metadata", _InstanceMetadata()))
    return CredentialChain(sources)


_chains: dict[tuple[tuple[str, str], ...], CredentialChain] = {}
_chains_lock = threading.Lock()


def shared_chain() -> CredentialChain:
    """One chain per process and environment: stores opened again and again (a Ray actor per task,
    a weight load per sync) share its credentials instead of asking STS each time."""
    key = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_") or k == "HOME"))
    with _chains_lock:
        if key not in _chains:
            _chains[key] = default_chain()
        return _chains[key]
