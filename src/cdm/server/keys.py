"""API keys for the service, kept in the store's own SQLite registry (two tables added by a small migration).

A key is a random token (``cdm_`` + 43 url-safe characters, 256 bits) shown once when it is created; the
registry keeps only its sha256, a short public prefix (to recognise it in listings), its name (the ``actor``
of every audit record it causes), whether it is an admin key, and the sources it may use::

    api_keys(id, name UNIQUE, key_sha256 UNIQUE, prefix, admin, created_at, created_by, revoked_at)
    api_key_sources(key_id -> api_keys.id, source_id -> sources.id ON DELETE CASCADE)

Grants reference ``sources(id)`` with ``ON DELETE CASCADE``: the store deletes the source row when it forgets a
source (its connection has ``foreign_keys=ON``), so the grants go in the same transaction and no key keeps the
forgotten name. An admin key may use every source and call the admin endpoints. Revoked keys keep their row
(name, prefix, times) for the audit trail and never authenticate again.

Key creation and revocation are appended to the store's audit log through :meth:`cdm.store.Store.record`.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import sqlite3
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from ..store import REGISTRY_NAME, Store, StoreError

__all__ = ["ApiKey", "ApiKeyError", "authenticate", "create_key", "ensure_schema", "hash_token", "list_keys",
           "revoke_key"]

TOKEN_PREFIX = "cdm_"
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    name        TEXT NOT NULL UNIQUE,
    key_sha256  TEXT NOT NULL UNIQUE,
    prefix      TEXT NOT NULL,
    admin       INTEGER NOT NULL DEFAULT 0,
    created_at  TEXT NOT NULL,
    created_by  TEXT NOT NULL,
    revoked_at  TEXT
);
CREATE TABLE IF NOT EXISTS api_key_sources (
    key_id    INTEGER NOT NULL REFERENCES api_keys(id) ON DELETE CASCADE,
    source_id TEXT NOT NULL REFERENCES sources(id) ON DELETE CASCADE,
    PRIMARY KEY (key_id, source_id)
);
"""


class ApiKeyError(StoreError):
    """A key name or token the key table cannot use (duplicate, unknown, malformed)."""


@dataclass(frozen=True)
class ApiKey:
    name: str
    admin: bool
    sources: tuple[str, ...]  # granted sources (an admin key may use every source, whatever this says)
    prefix: str
    created_at: str
    created_by: str
    revoked_at: str | None = None
    id: int = field(default=0, repr=False)

    def may_use(self, source: str) -> bool:
        return self.admin or source in self.sources

    def to_dict(self) -> dict:
        return {"name": self.name, "admin": self.admin, "sources": list(self.sources), "prefix": self.prefix,
                "created_at": self.created_at, "created_by": self.created_by, "revoked_at": self.revoked_at}


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _connect(store_path: str | Path) -> sqlite3.Connection:
    registry = Path(store_path) / REGISTRY_NAME
    if not registry.is_file():
        raise StoreError(f"{store_path} is not a compartment store (it has no {REGISTRY_NAME})")
    conn = sqlite3.connect(str(registry), isolation_level=None, timeout=60.0)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute("PRAGMA secure_delete=ON")
    return conn


def ensure_schema(store_path: str | Path) -> None:
    """The migration: add the key tables to a store's registry if they are missing (idempotent)."""
    conn = _connect(store_path)
    try:
        conn.executescript("BEGIN IMMEDIATE;" + _SCHEMA + "COMMIT;")
    finally:
        conn.close()


def _key(conn: sqlite3.Connection, row: sqlite3.Row) -> ApiKey:
    granted = tuple(r[0] for r in conn.execute(
        "SELECT source_id FROM api_key_sources WHERE key_id = ? ORDER BY source_id", (row["id"],)))
    return ApiKey(name=row["name"], admin=bool(row["admin"]), sources=granted, prefix=row["prefix"],
                  created_at=row["created_at"], created_by=row["created_by"], revoked_at=row["revoked_at"],
                  id=row["id"])


def create_key(store: Store, name: str, *, sources: list[str] | tuple[str, ...] = (), admin: bool = False,
               actor: str | None = None) -> tuple[str, ApiKey]:
    """Create a key; returns ``(token, key)``. The token is not stored anywhere: show it once."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ApiKeyError(f"bad key name {name!r}: use 1-64 letters, digits, '.', '_', '@' or '-'")
    sources = list(dict.fromkeys(sources))
    known = {s["id"] for s in store.sources()}
    unknown = [s for s in sources if s not in known]
    if unknown:
        raise ApiKeyError(f"unknown source '{unknown[0]}'; known: {', '.join(sorted(known)) or 'none'}")
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    ensure_schema(store.path)
    conn = _connect(store.path)
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            if conn.execute("SELECT 1 FROM api_keys WHERE name = ?", (name,)).fetchone():
                raise ApiKeyError(f"a key named '{name}' exists already (revoked keys keep their name)")
            cur = conn.execute("INSERT INTO api_keys (name, key_sha256, prefix, admin, created_at, created_by) "
                               "VALUES (?, ?, ?, ?, ?, ?)",
                               (name, hash_token(token), token[:10], int(admin), _now(), actor or "cli"))
            conn.executemany("INSERT INTO api_key_sources (key_id, source_id) VALUES (?, ?)",
                             [(cur.lastrowid, s) for s in sources])
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        key = _key(conn, conn.execute("SELECT * FROM api_keys WHERE name = ?", (name,)).fetchone())
    finally:
        conn.close()
    store.record("key-create", name, {"admin": bool(admin), "sources": sources, "prefix": key.prefix}, actor=actor)
    return token, key


def list_keys(store_path: str | Path) -> list[ApiKey]:
    ensure_schema(store_path)
    conn = _connect(store_path)
    try:
        return [_key(conn, r) for r in conn.execute("SELECT * FROM api_keys ORDER BY name")]
    finally:
        conn.close()


def revoke_key(store: Store, name: str, *, actor: str | None = None) -> ApiKey:
    ensure_schema(store.path)
    conn = _connect(store.path)
    try:
        row = conn.execute("SELECT * FROM api_keys WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise ApiKeyError(f"no key named '{name}'")
        if row["revoked_at"] is None:
            conn.execute("UPDATE api_keys SET revoked_at = ? WHERE id = ?", (_now(), row["id"]))
        key = _key(conn, conn.execute("SELECT * FROM api_keys WHERE id = ?", (row["id"],)).fetchone())
    finally:
        conn.close()
    if row["revoked_at"] is None:
        store.record("key-revoke", name, {"prefix": key.prefix}, actor=actor)
    return key


def authenticate(store_path: str | Path, token: str | None) -> ApiKey | None:
    """The live (not revoked) key with this token, or None. Grants are read fresh on every call, so a revoked
    key or a forgotten source takes effect at the next request."""
    if not token or not token.startswith(TOKEN_PREFIX) or len(token) > 200:
        return None
    conn = _connect(store_path)
    try:
        row = conn.execute("SELECT * FROM api_keys WHERE key_sha256 = ? AND revoked_at IS NULL",
                           (hash_token(token),)).fetchone()
        return None if row is None else _key(conn, row)
    finally:
        conn.close()
