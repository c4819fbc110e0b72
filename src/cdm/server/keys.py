"""API keys for the service. The store keeps them (its registry's ``api_keys`` and ``api_key_sources`` tables,
created by its schema migrations); this module makes tokens and reads keys as :class:`ApiKey`.

A key is a random token (``cdm_`` + 43 url-safe characters, 256 bits) shown once when it is created; the
registry keeps only its sha256, a short public prefix (to recognise it in listings), its name (the ``actor``
of every audit record it causes), whether it is an admin key, and its grants: sources by name, and access-tag
patterns (``license:CC-BY-*``: every source so tagged, those added later too). Named grants reference
``sources(id)`` with ``ON DELETE CASCADE``, so forgetting a source removes its grants in the same transaction.
A key change and its audit record are one transaction (:meth:`cdm.store.Store.add_key`, ``revoke_key``).
Revoked keys keep their row (name, prefix, times) for the audit trail and never authenticate again.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from ..store import Store, StoreError

__all__ = ["ApiKey", "ApiKeyError", "authenticate", "create_key", "hash_token", "list_keys", "revoke_key"]

TOKEN_PREFIX = "cdm_"


class ApiKeyError(StoreError):
    """A key name or token the key table cannot use (duplicate, unknown, malformed)."""


@dataclass(frozen=True)
class ApiKey:
    name: str
    admin: bool
    sources: tuple[str, ...]  # what it may use now: named grants and tag matches (an admin key: every source)
    prefix: str
    created_at: str
    created_by: str
    revoked_at: str | None = None
    granted: tuple[str, ...] = ()  # sources granted by name
    tags: tuple[str, ...] = ()  # access-tag patterns granted
    id: int = field(default=0, repr=False)

    def may_use(self, source: str) -> bool:
        return self.admin or source in self.sources

    def to_dict(self) -> dict:
        return {"name": self.name, "admin": self.admin, "sources": list(self.sources), "granted": list(self.granted),
                "tags": list(self.tags), "prefix": self.prefix,
                "created_at": self.created_at, "created_by": self.created_by, "revoked_at": self.revoked_at}

    @classmethod
    def from_row(cls, row: dict) -> ApiKey:
        return cls(name=row["name"], admin=row["admin"], sources=tuple(row["sources"]), prefix=row["prefix"],
                   created_at=row["created_at"], created_by=row["created_by"], revoked_at=row["revoked_at"],
                   granted=tuple(row["granted"]), tags=tuple(row["tags"]), id=row["id"])


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _with_store(store: Store | str | Path, fn):
    if isinstance(store, Store):
        return fn(store)
    with Store.open(store) as st:
        return fn(st)


def create_key(store: Store, name: str, *, sources: list[str] | tuple[str, ...] = (),
               tags: list[str] | tuple[str, ...] = (), admin: bool = False,
               actor: str | None = None) -> tuple[str, ApiKey]:
    """Create a key granted ``sources`` by name and every source with a tag matching one of ``tags``; returns
    ``(token, key)``. The token is not stored anywhere: show it once."""
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    try:
        row = store.add_key(name, key_sha256=hash_token(token), prefix=token[:10], admin=admin, sources=sources,
                            tags=tags, actor=actor or "cli")
    except StoreError as e:
        raise ApiKeyError(str(e)) from None
    return token, ApiKey.from_row(row)


def list_keys(store: Store | str | Path) -> list[ApiKey]:
    """Every key, revoked ones too (never a token)."""
    return _with_store(store, lambda st: [ApiKey.from_row(r) for r in st.keys()])


def revoke_key(store: Store, name: str, *, actor: str | None = None) -> ApiKey:
    try:
        return ApiKey.from_row(store.revoke_key(name, actor=actor))
    except StoreError as e:
        raise ApiKeyError(str(e)) from None


def authenticate(store: Store | str | Path, token: str | None) -> ApiKey | None:
    """The live (not revoked) key with this token, or None. Grants are read fresh on every call, so a revoked
    key or a forgotten source takes effect at the next request."""
    if not token or not token.startswith(TOKEN_PREFIX) or len(token) > 200:
        return None
    row = _with_store(store, lambda st: st.live_key(hash_token(token)))
    return None if row is None else ApiKey.from_row(row)
