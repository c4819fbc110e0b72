"""A compartment store on disk, and the protocol that keeps it consistent through a crash at any instant.

Layout of a store directory ``STORE``::

    STORE/registry.sqlite                           the registry (SQLite, WAL, synchronous=FULL, secure_delete)
    STORE/.lock                                     flock(2) target: writers exclusive, readers shared
    STORE/compartments/<cid>/prompts.safetensors    a compartment's tensors
    STORE/compartments/<cid>/manifest.json          its manifest (+ cid, kind, sources, backbone_hash, weights_sha256)
    STORE/work/<cid>/...                            resumable training state of a compartment being trained
    STORE/work/<cid>/cdm-work.json                  (optional) the sources that training uses, so forgetting finds it

The registry is the single source of truth. A compartment exists iff it has a row in ``compartments`` whose
``weights_sha256`` and ``manifest_sha256`` are the sha256 of the two files in ``compartments/<cid>/``.
Nothing else under ``compartments/`` may exist once a store is open and idle.

Writing a compartment (``put_compartment``), in this order:

1. write ``prompts.safetensors`` and ``manifest.json`` into ``compartments/.tmp-<random>/`` (each file written
   to a temporary name, fsynced and renamed), then fsync that directory;
2. if ``compartments/<cid>`` exists, rename it to ``compartments/.old-<random>-<cid>`` and fsync ``compartments/``;
3. rename the tmp directory to ``compartments/<cid>`` and fsync ``compartments/``;
4. in ONE SQLite transaction, upsert the ``compartments`` row and append the ``put`` audit record (COMMIT is the
   instant the new version becomes the truth: before it the old row, matching ``.old-*``, is the truth);
5. delete ``.old-<random>-<cid>`` and fsync ``compartments/``.

``recover()`` (run by :meth:`Store.open`, under the exclusive lock) restores the invariant from any prefix of
those steps, and from a crash inside recovery or any removal below:

* ``.tmp-*`` entries are deleted (an unfinished write: the registry never pointed at them);
* a ``.old-<random>-<cid>`` is rolled *forward* (deleted) if ``compartments/<cid>`` matches the registry row,
  rolled *back* (``compartments/<cid>`` renamed to a ``.tmp-*`` and deleted, the old one renamed into place) if
  it is the old copy that matches, and deleted otherwise;
* a ``compartments/<name>`` with no registry row is deleted (a write that never committed, or a removal that
  committed and was cut short before its files were gone);
* a row whose files are missing or whose hashes do not match is dropped, with a ``recover`` audit record
  (a damaged or tampered compartment), and its directory deleted;
* ``work/.tmp-*`` leftovers and ``work/<cid>`` whose recorded sources include an unknown (forgotten) source are
  deleted; finally the registry is VACUUMed if it has free pages and its WAL is checkpointed and truncated.

Removing (``remove_compartment``, ``forget_source``) commits the registry change first (row deletion + audit
record in one transaction), then deletes the files (renamed to ``.tmp-*`` first, so a half-deleted directory
never sits under a live name), then VACUUMs the registry and truncates its WAL, so the deleted rows survive
neither in the database file (``secure_delete`` zeroes them, VACUUM rebuilds the file) nor in the WAL. A crash
after the COMMIT leaves directories without rows, which recovery deletes.

The store assumes cooperating processes: every mutation and recovery holds an exclusive ``flock`` on
``STORE/.lock``, every read of compartment files a shared one (the kernel drops them when a process dies).
A :class:`Store` object is not thread-safe. Timestamps are UTC ISO-8601. No pickle is read or written:
tensors are safetensors, everything else JSON.
"""

from __future__ import annotations

import fnmatch
import getpass
import json
import os
import re
import secrets
import shutil
import sqlite3
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from ..errors import WeightsError
from ..io import atomic_write_json, file_sha256, load_state_dict, read_json, save_state_dict
from .errors import StoreError

try:  # POSIX; elsewhere the store still works for a single process
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

__all__ = ["KINDS", "MANIFEST_NAME", "PROMPTS_NAME", "REGISTRY_NAME", "RESERVED_NAMES", "SCHEMA_VERSION", "Store",
           "check_source_name"]

SCHEMA_VERSION = 5
APPLICATION_ID = 0x43444D53  # "CDMS": marks a SQLite file as a cdm compartment registry
REGISTRY_NAME = "registry.sqlite"
PROMPTS_NAME = "prompts.safetensors"
MANIFEST_NAME = "manifest.json"
WORK_RECORD_NAME = "cdm-work.json"
SAMPLES_NAME = "source.npz"  # a source's own samples, under work/data.<source>/
LATENTS_PREFIX = "latents-"  # work/data.<source>/latents-<content hash>-<autoencoder hash>.safetensors
TEXT_PREFIX = "text-"  # work/data.<source>/text-<content hash>-<text encoder hash>.safetensors (caption embeddings)
_DERIVED = {"latents": LATENTS_PREFIX, "text": TEXT_PREFIX}  # what is computed from a source's samples
LOCK_NAME = ".lock"
KINDS = ("compartment", "paragon", "router")  # the kinds cdm writes; any lower-case identifier is accepted

_CID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_KIND_RE = re.compile(r"[a-z][a-z0-9_-]{0,31}")
_OLD_RE = re.compile(r"\.old-([0-9a-f]{12})-(.+)")
_KEY_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
_MAX_LISTED = 8

_SCHEMA = """
CREATE TABLE sources (
    id           TEXT PRIMARY KEY,
    content_hash TEXT NOT NULL,
    n            INTEGER NOT NULL,
    classes      TEXT NOT NULL,          -- JSON list
    added_at     TEXT NOT NULL,
    added_by     TEXT NOT NULL,
    complete     INTEGER NOT NULL DEFAULT 1,  -- 0 while its compartment is being trained (an unfinished add)
    data_held    INTEGER NOT NULL DEFAULT 1   -- 0: imported (a compartment bundle); the store has no samples of it
);
CREATE TABLE meta (                      -- properties of the store: backbone_hash, backbone_ref
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE api_keys (                  -- the service's keys: only a token's sha256 is kept
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    name        TEXT NOT NULL UNIQUE,
    key_sha256  TEXT NOT NULL UNIQUE,
    prefix      TEXT NOT NULL,
    admin       INTEGER NOT NULL DEFAULT 0,
    created_at  TEXT NOT NULL,
    created_by  TEXT NOT NULL,
    revoked_at  TEXT
);
CREATE TABLE api_key_sources (           -- grants; forgetting a source deletes them (ON DELETE CASCADE)
    key_id    INTEGER NOT NULL REFERENCES api_keys(id) ON DELETE CASCADE,
    source_id TEXT NOT NULL REFERENCES sources(id) ON DELETE CASCADE,
    PRIMARY KEY (key_id, source_id)
);
CREATE TABLE api_key_tags (              -- grants by access tag (glob patterns): every source tagged so, now or later
    key_id    INTEGER NOT NULL REFERENCES api_keys(id) ON DELETE CASCADE,
    tag       TEXT NOT NULL,
    PRIMARY KEY (key_id, tag)
);
CREATE TABLE access_tags (
    source_id TEXT NOT NULL REFERENCES sources(id) ON DELETE CASCADE,
    tag       TEXT NOT NULL,
    PRIMARY KEY (source_id, tag)
);
CREATE TABLE compartments (
    cid             TEXT PRIMARY KEY,
    kind            TEXT NOT NULL,
    sources         TEXT NOT NULL,       -- JSON list of source ids it was trained on
    backbone_hash   TEXT NOT NULL,
    weights_sha256  TEXT NOT NULL,
    manifest_sha256 TEXT NOT NULL,
    created_at      TEXT NOT NULL
);
CREATE TABLE audit (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    ts          TEXT NOT NULL,
    actor       TEXT NOT NULL,
    action      TEXT NOT NULL,
    target      TEXT,
    details     TEXT NOT NULL,           -- JSON object
    before_hash TEXT,
    after_hash  TEXT
);
"""

# Schema migrations: MIGRATIONS[v] takes a registry from version v to v + 1 (run in one transaction on open).
MIGRATIONS: dict[int, Any] = {  # SQL, or a function of the connection returning it
    1: "ALTER TABLE sources ADD COLUMN complete INTEGER NOT NULL DEFAULT 1;"
       "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);",
    # the service's key tables, which cdm.server.keys used to add itself (IF NOT EXISTS: stores that have them)
    2: "CREATE TABLE IF NOT EXISTS api_keys (id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL UNIQUE, "
       "key_sha256 TEXT NOT NULL UNIQUE, prefix TEXT NOT NULL, admin INTEGER NOT NULL DEFAULT 0, "
       "created_at TEXT NOT NULL, created_by TEXT NOT NULL, revoked_at TEXT);"
       "CREATE TABLE IF NOT EXISTS api_key_sources (key_id INTEGER NOT NULL REFERENCES api_keys(id) ON DELETE "
       "CASCADE, source_id TEXT NOT NULL REFERENCES sources(id) ON DELETE CASCADE, PRIMARY KEY (key_id, source_id));",
    # keys granted by access tag (e.g. every source tagged license:CC-BY-4.0)
    3: "CREATE TABLE IF NOT EXISTS api_key_tags (key_id INTEGER NOT NULL REFERENCES api_keys(id) ON DELETE CASCADE, "
       "tag TEXT NOT NULL, PRIMARY KEY (key_id, tag));",
    # sources imported as compartment bundles (cdm import): the store holds no samples of them ("" when the column
    # is there already: a registry taken back to an older version by hand, as the migration tests do)
    4: lambda db: "" if "data_held" in {r[1] for r in db.execute("PRAGMA table_info(sources)")} else
       "ALTER TABLE sources ADD COLUMN data_held INTEGER NOT NULL DEFAULT 1;",
}

# Names a source may not take: they are the ids of joint compartments and of per-source heads and data.
RESERVED_NAMES = ("paragon", "router", "noisy-classifier")
_RESERVED_SUFFIXES = (".head",)
_RESERVED_PREFIXES = ("data.",)


# ----------------------------------------------------------------------------------------------- helpers


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _default_actor() -> str:
    try:
        return getpass.getuser() or "unknown"
    except (OSError, KeyError, ImportError):
        return "unknown"


def _actor(actor: str | None) -> str:
    if actor is None:
        return _default_actor()
    if not isinstance(actor, str) or not actor.strip():
        raise StoreError("actor must be a non-empty string")
    return actor


def _token() -> str:
    return secrets.token_hex(6)


def _listing(names: Iterable[str]) -> str:
    names = sorted(names)
    if not names:
        return "none"
    shown = ", ".join(names[:_MAX_LISTED])
    return shown + (f", ... ({len(names) - _MAX_LISTED} more)" if len(names) > _MAX_LISTED else "")


def _short(h: str) -> str:
    return f"{h[:8]}..." if len(h) > 8 else h


def _check_cid(cid: Any) -> str:
    if not isinstance(cid, str) or not _CID_RE.fullmatch(cid):
        raise StoreError(f"bad compartment id {cid!r}: use 1-128 letters, digits, '.', '_' or '-', not starting "
                         "with '.', '_' or '-'")
    return cid


def check_source_name(name: Any) -> str:
    """A new source's name: also its compartment id and part of file names in the store, so the compartment id
    rule (1-128 letters, digits, '.', '_' or '-', not starting with '.', '_' or '-'; no '..'), and not a
    reserved id (the paragon, routers, per-source heads and data). Returns it or raises StoreError."""
    if not isinstance(name, str) or not _CID_RE.fullmatch(name) or ".." in name:
        raise StoreError(f"bad source name {name!r}: use 1-128 letters, digits, '.', '_' or '-', not starting "
                         "with '.', '_' or '-'")
    if name in RESERVED_NAMES or name.endswith(_RESERVED_SUFFIXES) or name.startswith(_RESERVED_PREFIXES):
        raise StoreError(f"bad source name {name!r}: reserved for the store's own compartments "
                         f"({', '.join(RESERVED_NAMES)}, NAME.head, data.NAME)")
    return name


def _check_source_id(source_id: Any) -> str:
    if (not isinstance(source_id, str) or not source_id or len(source_id) > 256
            or not source_id.isprintable() or source_id != source_id.strip()):
        raise StoreError(f"bad source id {source_id!r}: use 1-256 printable characters without surrounding spaces")
    return source_id


def _check_tags(tags: Iterable[str]) -> list[str]:
    if isinstance(tags, str):
        raise StoreError("tags must be a list of strings, not one string")
    out = []
    for tag in tags:
        if not isinstance(tag, str) or not tag or len(tag) > 128 or not tag.isprintable():
            raise StoreError(f"bad access tag {tag!r}: use 1-128 printable characters")
        out.append(tag)
    return sorted(set(out))


def _check_hash(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value or len(value) > 256 or not value.isprintable():
        raise StoreError(f"{name} must be a non-empty string (a hex digest)")
    return value


def _dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _discard(path: Path) -> None:
    """Delete ``path`` (file or tree) so that a crash half-way never leaves a partial tree under its own name:
    it is first renamed to ``.tmp-<random>`` in the same directory (which recovery deletes)."""
    if not path.exists() and not path.is_symlink():
        return
    parent = path.parent
    if not path.name.startswith(".tmp-"):
        aside = parent / f".tmp-{_token()}"
        os.rename(path, aside)
        _fsync_dir(parent)
        path = aside
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()
    _fsync_dir(parent)


def _row_dict(row: sqlite3.Row) -> dict:
    d = dict(row)
    d["sources"] = json.loads(d["sources"])
    return d


# ----------------------------------------------------------------------------------------------- the store


class Store:
    """A compartment store directory. Use :meth:`create` or :meth:`open` (``Store(path)`` is :meth:`open`)."""

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        registry = path / REGISTRY_NAME
        if not path.is_dir():
            raise StoreError(f"{path}: no such store directory (create one with `cdm add SPEC --store {path} "
                             "--name NAME`)")
        if not registry.is_file():
            raise StoreError(f"{path} is not a compartment store (it has no {REGISTRY_NAME})")
        conn = sqlite3.connect(str(registry), isolation_level=None, timeout=60.0)
        try:
            app = conn.execute("PRAGMA application_id").fetchone()[0]
            version = conn.execute("PRAGMA user_version").fetchone()[0]
        except sqlite3.DatabaseError:
            conn.close()
            raise StoreError(f"{registry} is not a SQLite database; {path} is not a compartment store") from None
        if app != APPLICATION_ID:
            conn.close()
            raise StoreError(f"{registry} is not a cdm compartment registry; {path} is not a compartment store")
        if version > SCHEMA_VERSION:
            conn.close()
            raise StoreError(f"{path} was written by a newer cdm (registry schema {version}; this cdm reads up to "
                             f"{SCHEMA_VERSION}): upgrade cdm")
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA secure_delete=ON")
        self.path = path
        self._conn: sqlite3.Connection | None = conn
        self._cdir = path / "compartments"
        self._wdir = path / "work"
        self._cdir.mkdir(exist_ok=True)
        self._wdir.mkdir(exist_ok=True)
        self._lock_fd: int | None = os.open(path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        self._lock_depth = 0
        self._lock_exclusive = False
        try:
            self._migrate()
            #: what :meth:`recover` did when this store was opened (empty when it was consistent)
            self.recovered: list[str] = self.recover()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------------------------------- lifecycle

    @classmethod
    def open(cls, path: str | os.PathLike) -> Store:
        """Open an existing store and bring it back to a consistent state (:meth:`recover`)."""
        return cls(path)

    @classmethod
    def create(cls, path: str | os.PathLike, *, backbone_hash: str | None = None,
               backbone_ref: str | None = None) -> Store:
        """Create a store in a new or empty directory (an existing store is simply opened). ``backbone_hash``
        (and ``backbone_ref``, where to find it) make the backbone a property of the store from the start
        (:meth:`set_backbone`); an existing store with another backbone is refused."""
        path = Path(path)
        if backbone_hash is not None:
            _check_hash("backbone_hash", backbone_hash)
        if (path / REGISTRY_NAME).exists():
            st = cls(path)
            if backbone_hash is not None:
                try:
                    st.set_backbone(backbone_hash, backbone_ref)
                except BaseException:
                    st.close()
                    raise
            return st
        if path.exists() and not path.is_dir():
            raise StoreError(f"{path} is a file, not a directory")
        if path.is_dir() and not _is_blank(path):
            raise StoreError(f"{path} is not empty and is not a compartment store; pick a new or empty directory")
        path.mkdir(parents=True, exist_ok=True)
        for leftover in path.glob(".registry-*.tmp"):
            leftover.unlink()
        (path / "compartments").mkdir(exist_ok=True)
        (path / "work").mkdir(exist_ok=True)
        # Build the registry under a temporary name and rename it into place: a directory either has a
        # complete registry or none.
        tmp = path / f".registry-{_token()}.tmp"
        conn = sqlite3.connect(str(tmp), isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.executescript("BEGIN;" + _SCHEMA + f"PRAGMA user_version={SCHEMA_VERSION};"
                               f"PRAGMA application_id={APPLICATION_ID};COMMIT;")
        except BaseException:
            conn.close()
            tmp.unlink(missing_ok=True)
            raise
        conn.close()
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path / REGISTRY_NAME)
        _fsync_dir(path)
        st = cls(path)
        if backbone_hash is not None:
            st.set_backbone(backbone_hash, backbone_ref)
        return st

    def close(self) -> None:
        """Close the registry connection (idempotent)."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r}{'' if self._conn is not None else ', closed'})"

    # ------------------------------------------------------------------------------------------- plumbing

    @property
    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError(f"store {self.path} is closed")
        return self._conn

    @contextmanager
    def _locked(self, exclusive: bool) -> Iterator[None]:
        if self._conn is None:
            raise StoreError(f"store {self.path} is closed")
        if self._lock_depth:
            if exclusive and not self._lock_exclusive:
                raise RuntimeError("internal error: cannot upgrade a shared store lock")
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
            return
        if fcntl is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        self._lock_depth, self._lock_exclusive = 1, exclusive
        try:
            yield
        finally:
            self._lock_depth, self._lock_exclusive = 0, False
            if fcntl is not None and self._lock_fd is not None:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def _migrate(self) -> None:
        """Bring an older registry schema up to :data:`SCHEMA_VERSION` (one transaction per step)."""
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version >= SCHEMA_VERSION:
            return
        with self._locked(True):
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            while version < SCHEMA_VERSION:
                step = MIGRATIONS[version]
                self._db.executescript("BEGIN IMMEDIATE;" + (step(self._db) if callable(step) else step)
                                       + f"PRAGMA user_version={version + 1};COMMIT;")
                version += 1
            # A store from before backbones were recorded: its compartments name theirs.
            hashes = {r["backbone_hash"] for r in self._rows().values()}
            if len(hashes) == 1 and self._meta("backbone_hash") is None:
                with self._tx() as db:
                    db.execute("INSERT INTO meta (key, value) VALUES ('backbone_hash', ?)", (hashes.pop(),))

    def _meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    @property
    def backbone(self) -> dict | None:
        """The store's backbone: ``{"hash", "ref"}`` (``ref``: where to load it from, or None when unknown), or
        None before the first compartment of a store created without one."""
        h = self._meta("backbone_hash")
        return None if h is None else {"hash": h, "ref": self._meta("backbone_ref")}

    def set_backbone(self, backbone_hash: str, ref: str | None = None, *, actor: str | None = None) -> dict:
        """Record the store's backbone (once). The same hash again only updates an unknown ``ref``; another
        hash is refused: every compartment of a store shares one backbone."""
        _check_hash("backbone_hash", backbone_hash)
        if ref is not None and (not isinstance(ref, str) or not ref or not ref.isprintable()):
            raise StoreError("backbone ref must be a non-empty printable string")
        actor = _actor(actor)
        with self._locked(True):
            have = self.backbone
            if have is not None and have["hash"] != backbone_hash:
                raise StoreError(f"backbone {_short(backbone_hash)} is not this store's: {self.path} was created "
                                 f"with backbone {_short(have['hash'])}" + (f" ({have['ref']})" if have["ref"] else ""))
            if have is not None and (ref is None or have["ref"] is not None):
                return have
            with self._tx() as db:
                db.execute("INSERT INTO meta (key, value) VALUES ('backbone_hash', ?) ON CONFLICT(key) DO NOTHING",
                           (backbone_hash,))
                if ref is not None:
                    db.execute("INSERT INTO meta (key, value) VALUES ('backbone_ref', ?) "
                               "ON CONFLICT(key) DO UPDATE SET value = excluded.value", (ref,))
                self._audit(db, actor, "set-backbone", None, {"backbone_hash": backbone_hash, "ref": ref})
        return self.backbone

    def _audit(self, db: sqlite3.Connection, actor: str, action: str, target: str | None, details: dict,
               before: str | None = None, after: str | None = None) -> int:
        cur = db.execute("INSERT INTO audit (ts, actor, action, target, details, before_hash, after_hash) "
                         "VALUES (?, ?, ?, ?, ?, ?, ?)",
                         (_now(), actor, action, target, _dumps(details), before, after))
        return int(cur.lastrowid)

    def _vacuum(self) -> None:
        """Rebuild the registry file (no free page keeps deleted bytes) and empty the WAL."""
        self._db.execute("VACUUM")
        self._checkpoint()

    def _checkpoint(self) -> bool:
        """Copy the WAL into the database and truncate it to zero bytes; False if a reader kept it busy (another
        process in a read transaction), in which case the next open finishes it."""
        for _ in range(20):
            busy = self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
            if not busy:
                return True
            time.sleep(0.05)
        return False

    def _source_ids(self) -> list[str]:
        return [r[0] for r in self._db.execute("SELECT id FROM sources ORDER BY id")]

    def _require_source(self, source_id: str) -> sqlite3.Row:
        _check_source_id(source_id)
        row = self._db.execute("SELECT * FROM sources WHERE id = ?", (source_id,)).fetchone()
        if row is None:
            raise StoreError(f"unknown source '{source_id}'; known: {_listing(self._source_ids())}")
        return row

    def _rows(self) -> dict[str, dict]:
        return {r["cid"]: _row_dict(r) for r in self._db.execute("SELECT * FROM compartments ORDER BY cid")}

    def _row(self, cid: str) -> dict | None:
        r = self._db.execute("SELECT * FROM compartments WHERE cid = ?", (cid,)).fetchone()
        return None if r is None else _row_dict(r)

    def _require_row(self, cid: str) -> dict:
        _check_cid(cid)
        row = self._row(cid)
        if row is None:
            known = [r[0] for r in self._db.execute("SELECT cid FROM compartments")]
            raise StoreError(f"unknown compartment '{cid}'; known: {_listing(known)}")
        return row

    @staticmethod
    def _files_problem(row: dict, folder: Path) -> str | None:
        """Why ``folder`` is not the compartment ``row`` describes, or None when its files match the row."""
        weights, manifest = folder / PROMPTS_NAME, folder / MANIFEST_NAME
        if not folder.is_dir():
            return "its directory is missing"
        if not weights.is_file():
            return f"{PROMPTS_NAME} is missing"
        if not manifest.is_file():
            return f"{MANIFEST_NAME} is missing"
        if file_sha256(weights) != row["weights_sha256"]:
            return f"{PROMPTS_NAME} does not match its registry hash"
        if file_sha256(manifest) != row["manifest_sha256"]:
            return f"{MANIFEST_NAME} does not match its registry hash"
        return None

    # ------------------------------------------------------------------------------------------- sources

    def add_source(self, source_id: str, *, content_hash: str, n: int, classes: Iterable[Any],
                   tags: Iterable[str] = (), actor: str | None = None, pending: bool = False,
                   data_held: bool = True) -> dict:
        """Register a data source. Registering the same id again with the same content is a no-op; with other
        content it is refused (forget the old one first). ``pending``: its compartment is still to be trained;
        the source is listed (and :meth:`verify` reports it) as incomplete until a ``compartment`` of it is put.
        ``data_held=False``: an imported source (a compartment trained where its data lives, ``cdm import``): the
        store keeps no samples of it (:meth:`samples_file` refuses to make room for them), so nothing here can
        retrain it; its audit record says ``imported``."""
        _check_source_id(source_id)
        _check_hash("content_hash", content_hash)
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise StoreError(f"n must be a non-negative integer, got {n!r}")
        classes = list(classes)
        try:
            classes_json = _dumps(classes)
        except (TypeError, ValueError):
            raise StoreError("classes must be a JSON-serialisable list (ints or strings)") from None
        tags = _check_tags(tags)
        actor = _actor(actor)
        with self._locked(True):
            old = self._db.execute("SELECT * FROM sources WHERE id = ?", (source_id,)).fetchone()
            if old is not None:
                if old["content_hash"] == content_hash and old["n"] == n and old["classes"] == classes_json \
                        and bool(old["data_held"]) == bool(data_held):
                    return self.source(source_id)
                raise StoreError(f"source '{source_id}' is already registered with other content; forget it "
                                 "first to replace it")
            with self._tx() as db:
                db.execute("INSERT INTO sources (id, content_hash, n, classes, added_at, added_by, complete, "
                           "data_held) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                           (source_id, content_hash, n, classes_json, _now(), actor, int(not pending),
                            int(bool(data_held))))
                db.executemany("INSERT INTO access_tags (source_id, tag) VALUES (?, ?)",
                               [(source_id, t) for t in tags])
                # No content hash, size or classes in the audit log: it outlives the source.
                self._audit(db, actor, "add-source", source_id,
                            {"tags": tags} if data_held else {"tags": tags, "imported": True})
        return self.source(source_id)

    def record(self, action: str, target: str | None, details: dict, *, before: str | None = None,
               after: str | None = None, actor: str | None = None) -> int:
        """Append an audit record for an operation done above the store (e.g. a sample-level forget)."""
        actor = _actor(actor)
        with self._locked(True), self._tx() as db:
            return self._audit(db, actor, action, target, details, before=before, after=after)

    def update_source_content(self, source_id: str, *, content_hash: str, n: int, actor: str | None = None,
                              classes: Iterable[Any] | None = None, pending: bool = False) -> dict:
        """Record that a source's content changed (samples forgotten; an imported source re-imported, which may
        change its ``classes`` too). ``pending``: its new compartment is still to be stored (the source is listed
        as incomplete until it is). The audit record keeps the counts only."""
        _check_hash("content_hash", content_hash)
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise StoreError(f"n must be a non-negative integer, got {n!r}")
        classes_json = None
        if classes is not None:
            try:
                classes_json = _dumps(list(classes))
            except (TypeError, ValueError):
                raise StoreError("classes must be a JSON-serialisable list (ints or strings)") from None
        actor = _actor(actor)
        with self._locked(True):
            old = self._require_source(source_id)
            with self._tx() as db:
                db.execute("UPDATE sources SET content_hash = ?, n = ?, classes = ?, complete = ? WHERE id = ?",
                           (content_hash, n, classes_json or old["classes"], 0 if pending else old["complete"],
                            source_id))
                self._audit(db, actor, "update-source", source_id, {"n_before": old["n"], "n_after": n})
            folder = self._wdir / self._data_folder(source_id)
            derived = [f for prefix in _DERIVED.values() for f in folder.glob(prefix + "*")] if folder.is_dir() else []
            for f in sorted(derived):
                f.unlink()  # latents and caption embeddings of the old content: they hold the forgotten samples
            if folder.is_dir():
                _fsync_dir(folder)
            self._vacuum()
        return self.source(source_id)

    def sources(self) -> list[dict]:
        """Every registered source: ``id, content_hash, n, classes, tags, added_at, added_by, complete, data_held``
        (``complete`` is False while the compartment of an unfinished add is missing; ``data_held`` is False for an
        imported source, whose samples the store does not have)."""
        return [self._source_dict(r) for r in self._db.execute("SELECT * FROM sources ORDER BY id")]

    def source(self, source_id: str) -> dict:
        return self._source_dict(self._require_source(source_id))

    def _source_dict(self, row: sqlite3.Row) -> dict:
        d = dict(row)
        d["classes"] = json.loads(d["classes"])
        d["complete"] = bool(d["complete"])
        d["data_held"] = bool(d["data_held"])
        d["tags"] = self.tags(d["id"])
        return d

    def tags(self, source_id: str) -> list[str]:
        """The access tags of a source, sorted."""
        self._require_source(source_id)
        return [r[0] for r in self._db.execute("SELECT tag FROM access_tags WHERE source_id = ? ORDER BY tag",
                                               (source_id,))]

    def set_tags(self, source_id: str, tags: Iterable[str], actor: str | None = None) -> list[str]:
        """Replace the access tags of a source."""
        tags = _check_tags(tags)
        actor = _actor(actor)
        with self._locked(True):
            before = self.tags(source_id)
            with self._tx() as db:
                db.execute("DELETE FROM access_tags WHERE source_id = ?", (source_id,))
                db.executemany("INSERT INTO access_tags (source_id, tag) VALUES (?, ?)",
                               [(source_id, t) for t in tags])
                self._audit(db, actor, "set-tags", source_id, {"before": before, "after": tags})
        return tags

    # ------------------------------------------------------------------------------------------- compartments

    def put_compartment(self, cid: str, tensors: Mapping[str, torch.Tensor], manifest: Mapping[str, Any], *,
                        kind: str, sources: Iterable[str], backbone_hash: str, actor: str | None = None) -> dict:
        """Store (or replace) compartment ``cid``, atomically; returns its row with its ``manifest``.

        The manifest gets ``cid``, ``kind``, ``sources``, ``backbone_hash``, ``weights_sha256`` (sha256 of
        ``prompts.safetensors``) and ``created_at`` added (overriding keys of those names)."""
        _check_cid(cid)
        if not isinstance(kind, str) or not _KIND_RE.fullmatch(kind):
            raise StoreError(f"bad compartment kind {kind!r}: use a lower-case identifier such as {', '.join(KINDS)}")
        if isinstance(sources, str):
            raise StoreError("sources must be a list of source ids, not one string")
        sources = list(dict.fromkeys(_check_source_id(s) for s in sources))
        _check_hash("backbone_hash", backbone_hash)
        if not isinstance(tensors, Mapping) or not tensors:
            raise StoreError("tensors must be a non-empty dict of name -> torch.Tensor")
        for name, t in tensors.items():
            if not isinstance(name, str) or not isinstance(t, torch.Tensor):
                raise StoreError(f"tensors must map names to torch.Tensor (got {name!r}: {type(t).__name__})")
        if not isinstance(manifest, Mapping):
            raise StoreError("manifest must be a dict")
        actor = _actor(actor)
        created_at = _now()
        full = dict(manifest)
        full.update(cid=cid, kind=kind, sources=sources, backbone_hash=backbone_hash, created_at=created_at)
        try:
            _dumps(full)
        except (TypeError, ValueError) as e:
            raise StoreError(f"manifest is not JSON-serialisable ({e})") from None

        with self._locked(True):
            known = set(self._source_ids())
            unknown = [s for s in sources if s not in known]
            if unknown:
                raise StoreError(f"unknown source '{unknown[0]}'; known: {_listing(known)}")
            have = self.backbone
            if have is not None and have["hash"] != backbone_hash:
                raise StoreError(f"compartment '{cid}' is for backbone {_short(backbone_hash)}, but {self.path} was "
                                 f"created with backbone {_short(have['hash'])}: every compartment of a store "
                                 "shares its backbone")
            old_row = self._row(cid)

            # 1. everything into a fresh tmp directory, durably
            tmp = self._cdir / f".tmp-{_token()}"
            tmp.mkdir()
            try:
                save_state_dict(tmp / PROMPTS_NAME, tensors)
                full["weights_sha256"] = weights_sha = file_sha256(tmp / PROMPTS_NAME)
                atomic_write_json(tmp / MANIFEST_NAME, full)
                manifest_sha = file_sha256(tmp / MANIFEST_NAME)
                _fsync_dir(tmp)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise

            # 2-3. swap directories: old aside, new into place
            live = self._cdir / cid
            old = None
            try:
                if live.exists():
                    old = self._cdir / f".old-{_token()}-{cid}"
                    os.rename(live, old)
                    _fsync_dir(self._cdir)
                os.rename(tmp, live)
                _fsync_dir(self._cdir)
            except BaseException:
                self._undo_swap(live, tmp, old)
                raise

            # 4. commit: from here on the new version is the truth
            try:
                with self._tx() as db:
                    db.execute("INSERT INTO compartments (cid, kind, sources, backbone_hash, weights_sha256, "
                               "manifest_sha256, created_at) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(cid) DO UPDATE "
                               "SET kind=excluded.kind, sources=excluded.sources, "
                               "backbone_hash=excluded.backbone_hash, weights_sha256=excluded.weights_sha256, "
                               "manifest_sha256=excluded.manifest_sha256, created_at=excluded.created_at",
                               (cid, kind, _dumps(sources), backbone_hash, weights_sha, manifest_sha, created_at))
                    if have is None:
                        db.execute("INSERT INTO meta (key, value) VALUES ('backbone_hash', ?) "
                                   "ON CONFLICT(key) DO NOTHING", (backbone_hash,))
                    if kind == "compartment" and sources == [cid]:
                        db.execute("UPDATE sources SET complete = 1 WHERE id = ?", (cid,))
                    self._audit(db, actor, "put", cid,
                                {"kind": kind, "sources": sources, "backbone_hash": backbone_hash,
                                 "replaced": old_row is not None},
                                before=None if old_row is None else old_row["weights_sha256"], after=weights_sha)
            except BaseException:
                self._undo_swap(live, live if live.exists() else tmp, old, moved=True)
                raise

            # 5. the old version goes
            if old is not None:
                shutil.rmtree(old)
                _fsync_dir(self._cdir)
            row = self._require_row(cid)
        row["manifest"] = full
        return row

    def _undo_swap(self, live: Path, new: Path, old: Path | None, moved: bool = False) -> None:
        """Best-effort in-process rollback of a put that failed before its COMMIT (recovery covers a crash)."""
        try:
            if moved and new.exists():
                aside = self._cdir / f".tmp-{_token()}"
                os.rename(new, aside)
                new = aside
            if old is not None and old.exists() and not live.exists():
                os.rename(old, live)
            shutil.rmtree(new, ignore_errors=True)
            _fsync_dir(self._cdir)
        except OSError:
            pass  # recover() on the next open finishes the job

    def load_compartment(self, cid: str, *, backbone_hash: str) -> tuple[dict[str, torch.Tensor], dict]:
        """Load a compartment's tensors and manifest, refusing (:class:`WeightsError`) one trained on another
        backbone, a weight file or manifest that does not match its recorded hashes, and a pickle."""
        _check_hash("backbone_hash", backbone_hash)
        with self._locked(False):
            row = self._require_row(cid)
            if row["backbone_hash"] != backbone_hash:
                raise WeightsError(f"compartment '{cid}' was trained on backbone {_short(row['backbone_hash'])}, "
                                   f"this backbone is {_short(backbone_hash)}")
            folder = self._cdir / cid
            manifest_path, weights_path = folder / MANIFEST_NAME, folder / PROMPTS_NAME
            manifest = read_json(manifest_path)
            if file_sha256(manifest_path) != row["manifest_sha256"]:
                raise WeightsError(f"compartment '{cid}': {manifest_path} does not match its registry hash")
            tensors = load_state_dict(weights_path)  # refuses pickles and unreadable files
            actual = file_sha256(weights_path)
            if actual != manifest.get("weights_sha256"):
                raise WeightsError(f"compartment '{cid}': {weights_path} does not match its manifest hash "
                                   f"(file {_short(actual)}, manifest {_short(str(manifest.get('weights_sha256')))})")
            if actual != row["weights_sha256"]:
                raise WeightsError(f"compartment '{cid}': {weights_path} does not match its registry hash")
            if manifest.get("backbone_hash") != backbone_hash:
                raise WeightsError(f"compartment '{cid}': its manifest names another backbone than its registry row")
        return tensors, manifest

    def compartments(self, kind: str | None = None) -> list[dict]:
        """Registry rows (``cid, kind, sources, backbone_hash, weights_sha256, manifest_sha256, created_at``),
        sorted by cid, optionally only those of one kind."""
        rows = list(self._rows().values())
        return [r for r in rows if kind is None or r["kind"] == kind]

    def compartment(self, cid: str) -> dict:
        """One registry row plus its ``manifest`` (as stored on disk)."""
        with self._locked(False):
            row = self._require_row(cid)
            row["manifest"] = read_json(self._cdir / cid / MANIFEST_NAME)
        return row

    def compartments_of(self, source_id: str) -> list[dict]:
        """Every compartment trained on ``source_id`` (its own and joint ones)."""
        self._require_source(source_id)
        return [r for r in self._rows().values() if source_id in r["sources"]]

    def remove_compartment(self, cid: str, *, reason: str, actor: str | None = None) -> dict:
        """Delete a compartment (row, files, training state), with a ``remove`` audit record; returns its row."""
        actor = _actor(actor)
        if not isinstance(reason, str):
            raise StoreError("reason must be a string")
        with self._locked(True):
            row = self._require_row(cid)
            with self._tx() as db:
                db.execute("DELETE FROM compartments WHERE cid = ?", (cid,))
                self._audit(db, actor, "remove", cid, {"kind": row["kind"], "sources": row["sources"],
                                                        "reason": reason}, before=row["weights_sha256"])
            _discard(self._cdir / cid)
            _discard(self._wdir / cid)
            self._vacuum()
        return row

    def forget_source(self, source_id: str, *, reason: str, actor: str | None = None) -> dict:
        """Forget a data source: its row and tags, every compartment trained on it (joint ones too: they must
        be retrained without it), their files and training state; then rebuild the registry file.

        Returns ``{"source", "removed": [cid...], "retrain": [{"cid", "kind", "sources"}...], "work_removed":
        [cid...], "audit_seq"}``, where ``retrain`` lists the removed joint compartments with the sources they
        were trained on besides the forgotten one."""
        actor = _actor(actor)
        if not isinstance(reason, str):
            raise StoreError("reason must be a string")
        with self._locked(True):
            self._require_source(source_id)
            rows = [r for r in self._rows().values() if source_id in r["sources"]]
            removed = [r["cid"] for r in rows]
            retrain = [{"cid": r["cid"], "kind": r["kind"], "sources": [s for s in r["sources"] if s != source_id]}
                       for r in rows if len(r["sources"]) > 1]
            work = sorted(set(removed) | set(self._work_using(source_id)))
            work_removed = [c for c in work if (self._wdir / c).exists()]
            # Training state first: if we crash before the commit, nothing is forgotten but no state either.
            for c in work_removed:
                _discard(self._wdir / c)
            with self._tx() as db:
                db.executemany("DELETE FROM compartments WHERE cid = ?", [(c,) for c in removed])
                db.execute("DELETE FROM access_tags WHERE source_id = ?", (source_id,))
                db.execute("DELETE FROM sources WHERE id = ?", (source_id,))
                before = ",".join(r["weights_sha256"] for r in rows) or None
                seq = self._audit(db, actor, "forget-source", source_id, {
                    "reason": reason,
                    "removed": [{"cid": r["cid"], "kind": r["kind"], "weights_sha256": r["weights_sha256"]}
                                for r in rows],
                    "retrain": retrain,
                    "work_removed": work_removed,
                }, before=before, after=None)
            for c in removed:
                _discard(self._cdir / c)
            self._vacuum()
        return {"source": source_id, "removed": removed, "retrain": retrain, "work_removed": work_removed,
                "audit_seq": seq}

    # ------------------------------------------------------------------------------------------- training state

    def work_dir(self, cid: str, *, sources: Iterable[str] | None = None) -> Path:
        """The directory for resumable training state of ``cid`` (created on demand). Pass ``sources`` (the
        source ids being trained on) so that forgetting any of them also deletes this state while the
        compartment is not yet registered."""
        _check_cid(cid)
        path = self._wdir / cid
        if sources is not None:
            if isinstance(sources, str):
                raise StoreError("sources must be a list of source ids, not one string")
            sources = list(dict.fromkeys(_check_source_id(s) for s in sources))
            with self._locked(True):
                known = set(self._source_ids())
                for s in sources:
                    if s not in known:
                        raise StoreError(f"unknown source '{s}'; known: {_listing(known)}")
                path.mkdir(parents=True, exist_ok=True)
                atomic_write_json(path / WORK_RECORD_NAME, {"cid": cid, "sources": sources})
        else:
            path.mkdir(parents=True, exist_ok=True)
        return path

    def samples_file(self, source_id: str, *, create: bool = False) -> Path:
        """Where a source's own samples are kept (``work/data.<source>/source.npz``), registered as training state
        of that source so forgetting it deletes them. ``create``: make the folder (the source must exist); the
        caller writes the file atomically. Nothing outside the store spells this layout."""
        _check_source_id(source_id)
        if create:
            if not self._require_source(source_id)["data_held"]:
                raise StoreError(f"source '{source_id}' is imported: this store holds no samples of it")
            return self.work_dir(self._data_folder(source_id), sources=[source_id]) / SAMPLES_NAME
        self._require_source(source_id)
        return self._wdir / self._data_folder(source_id) / SAMPLES_NAME

    @staticmethod
    def _data_folder(source_id: str) -> str:
        """The work folder of a source's own data: its samples and cached latents."""
        return f"{_RESERVED_PREFIXES[0]}{source_id}"

    def latents_file(self, source_id: str, *, content_hash: str, autoencoder_hash: str) -> Path:
        """Where a source's cached latents under one autoencoder live: beside its samples, named by the source's
        content hash and the autoencoder's hash (``work/data.<source>/latents-<content>-<autoencoder>``). Forgetting
        the source deletes them with its samples; forgetting samples (:meth:`update_source_content`) deletes every
        latent file of the old content. The caller writes the file atomically (the folder exists)."""
        return self.derived_file(source_id, "latents", content_hash=content_hash, model_hash=autoencoder_hash)

    def derived_file(self, source_id: str, kind: str, *, content_hash: str, model_hash: str) -> Path:
        """Where data computed from a source's samples by one model lives: ``kind`` "latents" (an autoencoder) or
        "text" (caption embeddings of a text encoder), ``work/data.<source>/<kind>-<content>-<model>.safetensors``;
        deleted with the samples exactly as :meth:`latents_file` says."""
        _check_hash("content_hash", content_hash)
        _check_hash("model_hash", model_hash)
        if kind not in _DERIVED:
            raise StoreError(f"unknown derived data {kind!r} (expected one of {', '.join(_DERIVED)})")
        folder = self.samples_file(source_id).parent
        if not folder.is_dir():
            raise StoreError(f"source '{source_id}' has no samples in {self.path}; re-add it")
        return folder / f"{_DERIVED[kind]}{content_hash[:32]}-{model_hash[:32]}.safetensors"

    def clear_work(self, cid: str) -> bool:
        """Delete the training state of ``cid``; True if there was any."""
        _check_cid(cid)
        with self._locked(True):
            existed = (self._wdir / cid).exists()
            _discard(self._wdir / cid)
        return existed

    def _work_sources(self, folder: Path) -> list[str] | None:
        record = folder / WORK_RECORD_NAME
        if not record.is_file():
            return None
        try:
            srcs = json.loads(record.read_text()).get("sources")
        except (OSError, ValueError, AttributeError):
            return None
        return [s for s in srcs if isinstance(s, str)] if isinstance(srcs, list) else None

    def _work_using(self, source_id: str) -> list[str]:
        out = []
        for entry in sorted(self._wdir.iterdir()) if self._wdir.is_dir() else ():
            if entry.is_dir() and not entry.name.startswith("."):
                srcs = self._work_sources(entry)
                if srcs is not None and source_id in srcs:
                    out.append(entry.name)
        return out

    # ------------------------------------------------------------------------------------------- API keys

    def _key_dict(self, row: sqlite3.Row) -> dict:
        """A key row with its grants: ``granted`` (sources named when it was made), ``tags`` (access-tag patterns)
        and ``sources``, what it may use now: the named sources and every source with a tag a pattern matches."""
        d = dict(row)
        d["admin"] = bool(d["admin"])
        d["granted"] = [r[0] for r in self._db.execute(
            "SELECT source_id FROM api_key_sources WHERE key_id = ? ORDER BY source_id", (d["id"],))]
        d["tags"] = [r[0] for r in self._db.execute(
            "SELECT tag FROM api_key_tags WHERE key_id = ? ORDER BY tag", (d["id"],))]
        by_tag = set()
        if d["tags"]:
            for source_id, tag in self._db.execute("SELECT source_id, tag FROM access_tags"):
                if any(fnmatch.fnmatchcase(tag, pattern) for pattern in d["tags"]):
                    by_tag.add(source_id)
        d["sources"] = sorted(set(d["granted"]) | by_tag)
        return d

    def add_key(self, name: str, *, key_sha256: str, prefix: str, admin: bool = False, sources: Iterable[str] = (),
                tags: Iterable[str] = (), actor: str | None = None) -> dict:
        """Register an API key (its token's sha256 and a short public prefix, never the token) with its grants:
        ``sources`` by name, ``tags`` by access tag (``fnmatch`` patterns: ``license:CC-BY-*`` grants every source
        tagged with a CC-BY licence, those added later too); the key and its ``key-create`` audit record are one
        transaction."""
        if not isinstance(name, str) or not _KEY_NAME_RE.fullmatch(name):
            raise StoreError(f"bad key name {name!r}: use 1-64 letters, digits, '.', '_', '@' or '-'")
        _check_hash("key_sha256", key_sha256)
        if isinstance(sources, str):
            raise StoreError("sources must be a list of source ids, not one string")
        sources = list(dict.fromkeys(_check_source_id(s) for s in sources))
        tags = list(dict.fromkeys(_check_tags(tags)))
        actor = _actor(actor)
        with self._locked(True):
            known = set(self._source_ids())
            unknown = [s for s in sources if s not in known]
            if unknown:
                raise StoreError(f"unknown source '{unknown[0]}'; known: {_listing(known)}")
            if self._db.execute("SELECT 1 FROM api_keys WHERE name = ?", (name,)).fetchone():
                raise StoreError(f"a key named '{name}' exists already (revoked keys keep their name)")
            with self._tx() as db:
                cur = db.execute("INSERT INTO api_keys (name, key_sha256, prefix, admin, created_at, created_by) "
                                 "VALUES (?, ?, ?, ?, ?, ?)", (name, key_sha256, prefix, int(admin), _now(), actor))
                db.executemany("INSERT INTO api_key_sources (key_id, source_id) VALUES (?, ?)",
                               [(cur.lastrowid, s) for s in sources])
                db.executemany("INSERT INTO api_key_tags (key_id, tag) VALUES (?, ?)",
                               [(cur.lastrowid, t) for t in tags])
                self._audit(db, actor, "key-create", name, {"admin": bool(admin), "sources": sources, "tags": tags,
                                                            "prefix": prefix})
            return self._key_dict(self._db.execute("SELECT * FROM api_keys WHERE name = ?", (name,)).fetchone())

    def keys(self) -> list[dict]:
        """Every API key (revoked ones too): ``id, name, key_sha256, prefix, admin, granted, tags, sources,
        created_at, created_by, revoked_at`` (see :meth:`_key_dict`)."""
        return [self._key_dict(r) for r in self._db.execute("SELECT * FROM api_keys ORDER BY name")]

    def live_key(self, key_sha256: str) -> dict | None:
        """The key whose token hashes to ``key_sha256``, unless revoked; grants as they are now."""
        row = self._db.execute("SELECT * FROM api_keys WHERE key_sha256 = ? AND revoked_at IS NULL",
                               (key_sha256,)).fetchone()
        return None if row is None else self._key_dict(row)

    def revoke_key(self, name: str, *, actor: str | None = None) -> dict:
        """Revoke a key (its row stays for the audit trail); the change and its ``key-revoke`` record are one
        transaction. Revoking a revoked key changes nothing."""
        actor = _actor(actor)
        with self._locked(True):
            row = self._db.execute("SELECT * FROM api_keys WHERE name = ?", (name,)).fetchone()
            if row is None:
                raise StoreError(f"no key named '{name}'")
            if row["revoked_at"] is None:
                with self._tx() as db:
                    db.execute("UPDATE api_keys SET revoked_at = ? WHERE id = ?", (_now(), row["id"]))
                    self._audit(db, actor, "key-revoke", name, {"prefix": row["prefix"]})
            return self._key_dict(self._db.execute("SELECT * FROM api_keys WHERE id = ?", (row["id"],)).fetchone())

    # ------------------------------------------------------------------------------------------- audit, checks

    def audit_log(self, limit: int | None = None) -> list[dict]:
        """Audit records, oldest first (with ``limit``: the latest ``limit`` of them); ``details`` parsed."""
        if limit is None:
            rows = self._db.execute("SELECT * FROM audit ORDER BY seq").fetchall()
        else:
            rows = self._db.execute("SELECT * FROM (SELECT * FROM audit ORDER BY seq DESC LIMIT ?) ORDER BY seq",
                                    (max(0, int(limit)),)).fetchall()
        out = []
        for r in rows:
            d = dict(r)
            d["details"] = json.loads(d["details"])
            out.append(d)
        return out

    def verify(self) -> list[str]:
        """Every inconsistency found (empty: consistent): rows whose files are missing or do not match their
        hashes, directories without rows, leftovers of interrupted writes, unknown sources, SQLite damage."""
        problems: list[str] = []
        with self._locked(False):
            db = self._db
            check = [r[0] for r in db.execute("PRAGMA integrity_check")]
            if check != ["ok"]:
                problems.extend(f"registry: {c}" for c in check)
            for r in db.execute("PRAGMA foreign_key_check"):
                problems.append(f"registry: foreign key violation in table {r[0]}")
            rows = self._rows()
            known = set(self._source_ids())
            for sid, held in db.execute("SELECT id, data_held FROM sources WHERE complete = 0 ORDER BY id"):
                again = "`cdm add`" if held else "`cdm import`"
                problems.append(f"source '{sid}' is incomplete (an add stopped before its compartment was stored): "
                                f"rerun the same {again} to resume, or `cdm forget {sid} --store {self.path}`")
            hashes = {r["backbone_hash"] for r in rows.values()}
            have = self._meta("backbone_hash")
            if have is not None and hashes - {have}:
                problems.append(f"compartments of another backbone than the store's ({_short(have)}): "
                                + ", ".join(sorted(c for c, r in rows.items() if r["backbone_hash"] != have)))
            for cid, row in rows.items():
                folder = self._cdir / cid
                problem = self._files_problem(row, folder)
                if problem is not None:
                    problems.append(f"compartment '{cid}': {problem}")
                    continue
                try:
                    manifest = read_json(folder / MANIFEST_NAME)
                except WeightsError as e:
                    problems.append(f"compartment '{cid}': {e}")
                    continue
                for key in ("weights_sha256", "backbone_hash", "kind", "sources"):
                    if manifest.get(key) != row[key]:
                        problems.append(f"compartment '{cid}': manifest {key} differs from its registry row")
                if manifest.get("cid") != cid:
                    problems.append(f"compartment '{cid}': manifest names another cid")
                for s in row["sources"]:
                    if s not in known:
                        problems.append(f"compartment '{cid}': trained on unknown source '{s}'")
            for entry in sorted(self._cdir.iterdir()):
                if entry.name.startswith((".tmp-", ".old-")):
                    problems.append(f"leftover of an interrupted write: compartments/{entry.name}")
                elif entry.name not in rows or not entry.is_dir():
                    problems.append(f"compartments/{entry.name} has no registry row")
            for entry in sorted(self._wdir.iterdir()):
                if entry.name.startswith(".tmp-"):
                    problems.append(f"leftover of an interrupted removal: work/{entry.name}")
                elif entry.is_dir():
                    srcs = self._work_sources(entry)
                    if srcs is not None and any(s not in known for s in srcs):
                        problems.append(f"work/{entry.name} trains on a source that is not registered")
        return problems

    def recover(self, actor: str | None = None) -> list[str]:
        """Bring the store back to a consistent state after a crash (see the module docstring). Returns what it
        did, one line per action; an empty list when the store was already consistent."""
        actor = _actor(actor)
        done: list[str] = []
        with self._locked(True):
            rows = self._rows()
            # interrupted writes and removals
            for entry in sorted(self._cdir.iterdir()):
                if entry.name.startswith(".tmp-"):
                    _discard(entry)
                    done.append(f"deleted unfinished compartments/{entry.name}")
            # interrupted replacements: roll forward or back to what the registry says
            for entry in sorted(self._cdir.iterdir()):
                m = _OLD_RE.fullmatch(entry.name)
                if not entry.name.startswith(".old-"):
                    continue
                cid = m.group(2) if m else None
                row = rows.get(cid) if cid else None
                live = self._cdir / cid if cid else None
                if row is not None and live.is_dir() and self._files_problem(row, live) is None:
                    _discard(entry)
                    done.append(f"'{cid}': replacement had committed; deleted the previous version")
                elif row is not None and self._files_problem(row, entry) is None:
                    _discard(live)
                    os.rename(entry, live)
                    _fsync_dir(self._cdir)
                    done.append(f"'{cid}': replacement had not committed; restored the previous version")
                else:
                    _discard(entry)
                    done.append(f"deleted stale compartments/{entry.name}")
            # directories (or stray files) the registry does not know
            for entry in sorted(self._cdir.iterdir()):
                if entry.name not in rows or not entry.is_dir():
                    _discard(entry)
                    done.append(f"deleted compartments/{entry.name}: no registry row")
            # rows whose files are gone or do not match
            bad = [(row, p) for row in rows.values() if (p := self._files_problem(row, self._cdir / row["cid"]))]
            if bad:
                with self._tx() as db:
                    for row, problem in bad:
                        db.execute("DELETE FROM compartments WHERE cid = ?", (row["cid"],))
                        self._audit(db, actor, "recover", row["cid"],
                                    {"problem": problem, "kind": row["kind"], "sources": row["sources"],
                                     "action": "dropped registry row and files"}, before=row["weights_sha256"])
                for row, problem in bad:
                    _discard(self._cdir / row["cid"])
                    done.append(f"dropped compartment '{row['cid']}': {problem}")
            # training state: interrupted removals, and state of forgotten sources
            known = set(self._source_ids())
            for entry in sorted(self._wdir.iterdir()):
                if entry.name.startswith(".tmp-"):
                    _discard(entry)
                    done.append(f"deleted unfinished work/{entry.name}")
                elif entry.is_dir():
                    srcs = self._work_sources(entry)
                    if srcs is not None and any(s not in known for s in srcs):
                        _discard(entry)
                        done.append(f"deleted work/{entry.name}: it trains on a source that is not registered")
            if bad or self._db.execute("PRAGMA freelist_count").fetchone()[0] > 0:
                self._db.execute("VACUUM")
            self._checkpoint()
        return done


def _is_blank(path: Path) -> bool:
    """An empty directory, or what an interrupted :meth:`Store.create` leaves behind."""
    for entry in path.iterdir():
        if entry.name in ("compartments", "work") and entry.is_dir() and not any(entry.iterdir()):
            continue
        if entry.name == LOCK_NAME or (entry.name.startswith(".registry-") and entry.name.endswith(".tmp")):
            continue
        return False
    return True
