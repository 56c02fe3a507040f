"""Who is asking: bearer tokens mapped to tenants, and the job keys that keep
tenants apart.

Tokens (read once, at start):

    CROPI_TOKEN / CROPI_TOKEN_FILE     the token of the tenant `default` (the simple, single-team case)
    CROPI_TENANTS_DIR                  a folder of files <tenant> holding that tenant's token
                                       (a Secret with one key per tenant, mounted as a volume)
    CROPI_OPERATOR_TOKEN_FILE          the CurriculumJob operator's token: it acts for the tenant
                                       it names in the X-Cropi-Tenant header (its object's namespace)

A tenant sees, follows and cancels only its own jobs. A job is stored under
its key: the name for the tenant `default` (what a single-team install always
had), `<tenant>.<name>` for the others. Job names and tenant names are DNS
labels, which have no dot, so a key names one tenant's job and no other.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cropi.client import TENANT_HEADER
from cropi.errors import InputError

DEFAULT_TENANT = "default"
__all__ = ["TENANT_HEADER", "Tenants", "Identity", "job_key", "split_job_key", "is_label"]
TENANTS_DIR_ENV = "CROPI_TENANTS_DIR"
OPERATOR_TOKEN_ENV = "CROPI_OPERATOR_TOKEN_FILE"
_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
MIN_TOKEN_CHARS = 12  # shorter is guessable; the chart generates 40


def is_label(value: str) -> bool:
    """A DNS label: what job and tenant names are (and a Kubernetes namespace is)."""
    return _LABEL.fullmatch(value) is not None


def job_key(tenant: str, name: str) -> str:
    """The key a tenant's job is stored under (Redis records, store prefixes, task ids)."""
    return name if tenant == DEFAULT_TENANT else f"{tenant}.{name}"


def split_job_key(key: str) -> tuple[str, str]:
    """(tenant, name) of a job key."""
    tenant, dot, name = key.partition(".")
    return (tenant, name) if dot else (DEFAULT_TENANT, key)


@dataclass(frozen=True)
class Identity:
    tenant: str
    operator: bool = False  # may act for the tenant it names (the operator, one namespace per request)


class Tenants:
    """Bearer tokens -> identities. A token is compared with every known token in constant time,
    so that how long a refusal takes says nothing about how close a guess was."""

    def __init__(self, tokens: dict[str, Identity] | list[tuple[str, Identity]]):
        pairs = list(tokens.items()) if isinstance(tokens, dict) else list(tokens)
        if not pairs:
            raise InputError("the controller needs a bearer token: set CROPI_TOKEN or CROPI_TOKEN_FILE "
                             f"(or {TENANTS_DIR_ENV})")
        seen: dict[bytes, Identity] = {}
        for token, identity in pairs:
            if len(token) < MIN_TOKEN_CHARS:
                raise InputError(f"the token of tenant {identity.tenant} is shorter than {MIN_TOKEN_CHARS} "
                                 "characters; generate a longer one (e.g. `openssl rand -hex 20`)")
            digest = hashlib.sha256(token.encode()).digest()
            if digest in seen and seen[digest] != identity:
                raise InputError(f"tenants {seen[digest].tenant} and {identity.tenant} have the same token")
            seen[digest] = identity
        self._by_digest = seen

    @classmethod
    def single(cls, token: str) -> Tenants:
        """One token, one tenant (`default`): the simple case, and the tests'."""
        return cls([(token, Identity(DEFAULT_TENANT))] if token else [])

    @classmethod
    def from_env(cls, token: str = "") -> Tenants:
        """The tokens the environment names (see the module docstring); `token`: the default tenant's."""
        tokens: list[tuple[str, Identity]] = []
        if token:
            tokens.append((token, Identity(DEFAULT_TENANT)))
        folder = os.environ.get(TENANTS_DIR_ENV, "").strip()
        if folder:
            tokens += _tenant_tokens(Path(folder))
        operator_file = os.environ.get(OPERATOR_TOKEN_ENV, "").strip()
        if operator_file:
            tokens.append((_read_token(Path(operator_file), OPERATOR_TOKEN_ENV), Identity(DEFAULT_TENANT, operator=True)))
        return cls(tokens)

    def identify(self, header: str | None) -> Identity | None:
        """The identity of an `Authorization: Bearer <token>` header; None when it names none."""
        scheme, _, credentials = (header or "").partition(" ")
        if scheme.lower() != "bearer":
            return None
        digest = hashlib.sha256(credentials.strip().encode()).digest()
        found = None
        for known, identity in self._by_digest.items():  # no early exit: same time for every token
            if hmac.compare_digest(digest, known):
                found = identity
        return found

    def tenant_of(self, identity: Identity, named: str | None) -> str:
        """The tenant a request acts for: the token's own, or (the operator only) the one it names.
        InputError when a tenant is named by a token that may not, or is not a DNS label."""
        if not named:
            return identity.tenant
        if not identity.operator:
            if named == identity.tenant:
                return named
            raise InputError(f"{TENANT_HEADER}: this token acts for its own tenant only")
        if not is_label(named):
            raise InputError(f"{TENANT_HEADER}: not a tenant name (a DNS label, like a namespace)")
        return named


def _read_token(path: Path, what: str) -> str:
    try:
        return path.read_text().strip()
    except OSError as err:
        raise InputError(f"{what}: cannot read {path}: {err.strerror}") from None


def _tenant_tokens(folder: Path) -> list[tuple[str, Identity]]:
    """A mounted Secret: one file per tenant. Kubernetes' own entries (`..data`, `..2024_...`) are skipped."""
    if not folder.is_dir():
        raise InputError(f"{TENANTS_DIR_ENV}: {folder} is not a folder")
    tokens = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if not is_label(entry.name):
            raise InputError(f"{TENANTS_DIR_ENV}: {entry.name!r} is not a tenant name (a DNS label)")
        if entry.name == DEFAULT_TENANT:
            raise InputError(f"{TENANTS_DIR_ENV}: the tenant {DEFAULT_TENANT} takes CROPI_TOKEN, not a file")
        tokens.append((_read_token(entry, TENANTS_DIR_ENV), Identity(entry.name)))
    return tokens
