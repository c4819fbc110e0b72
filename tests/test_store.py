"""Tests for cdm.store: registry, atomic compartments, verification, forgetting without a trace, crash safety."""

from __future__ import annotations

import io
import os
import pickle
import re
import select
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cdm.errors import WeightsError
from cdm.io import file_sha256, state_dict_sha256
from cdm.store import MANIFEST_NAME, PROMPTS_NAME, REGISTRY_NAME, SCHEMA_VERSION, Store, StoreError, check_source_name

torch.set_num_threads(1)

BB = "ab" * 32            # the backbone hash every test compartment is trained on
OTHER_BB = "9f8e7d6c" * 8


def _tensors(seed: int = 0, n: int = 64) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "prompts": torch.randn(4, n, generator=g),
        "prompts_half": torch.randn(3, n, generator=g).to(torch.float16),
        "bias": torch.randn(n, generator=g).to(torch.bfloat16),
        "ids": torch.randint(0, 1000, (5,), generator=g),
    }


def _put(store: Store, cid: str, seed: int = 0, *, sources=("s1",), kind: str = "compartment", **manifest) -> dict:
    return store.put_compartment(cid, _tensors(seed), {"seed": seed, **manifest}, kind=kind, sources=list(sources),
                                 backbone_hash=BB, actor="tester")


@pytest.fixture
def store(tmp_path):
    with Store.create(tmp_path / "store") as st:
        st.add_source("s1", content_hash="11" * 32, n=100, classes=[0, 1, 2], tags=["protected"], actor="tester")
        yield st


# ------------------------------------------------------------------------------------------------ basics


def test_create_open_and_registry_settings(tmp_path):
    root = tmp_path / "store"
    with Store.create(root) as st:
        assert st.recovered == []
        db = st._db
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert db.execute("PRAGMA foreign_keys").fetchone()[0] == 1
        assert db.execute("PRAGMA secure_delete").fetchone()[0] == 1
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert {"sources", "access_tags", "compartments", "audit"} <= tables
        assert st.verify() == []
    assert {p.name for p in root.iterdir()} >= {REGISTRY_NAME, "compartments", "work"}
    with Store.create(root) as st:  # an existing store is opened, not recreated
        assert st.sources() == []
    with Store.open(root) as st:
        assert st.compartments() == []

    with pytest.raises(StoreError, match="no such store"):
        Store.open(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreError, match="not a compartment store"):
        Store.open(tmp_path / "empty")
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("hello")
    with pytest.raises(StoreError, match="not empty"):
        Store.create(junk)
    (junk / REGISTRY_NAME).write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match="not a SQLite database"):
        Store.open(junk)
    other = tmp_path / "other"
    other.mkdir()
    sqlite3.connect(other / REGISTRY_NAME).execute("CREATE TABLE t (x)").connection.close()
    with pytest.raises(StoreError, match="not a cdm compartment registry"):
        Store.open(other)
    st = Store.open(root)
    st.close()
    st.close()
    with pytest.raises(StoreError, match="closed"):
        st.sources()


def test_sources_and_tags(store):
    store.add_source("s2", content_hash="22" * 32, n=7, classes=["a", "b"], tags=["public", "cc-by"])
    assert [s["id"] for s in store.sources()] == ["s1", "s2"]
    s2 = store.source("s2")
    assert s2["n"] == 7 and s2["classes"] == ["a", "b"] and s2["tags"] == ["cc-by", "public"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", s2["added_at"])
    assert s2["added_by"]  # getpass.getuser() by default
    # registering the same content again is a no-op; other content is refused
    store.add_source("s2", content_hash="22" * 32, n=7, classes=["a", "b"])
    with pytest.raises(StoreError, match="already registered"):
        store.add_source("s2", content_hash="33" * 32, n=7, classes=["a", "b"])
    assert store.set_tags("s2", ["licensed"], actor="admin") == ["licensed"]
    assert store.tags("s2") == ["licensed"]
    last = store.audit_log(limit=1)[0]
    assert last["action"] == "set-tags" and last["actor"] == "admin" and last["details"]["after"] == ["licensed"]
    # the audit log never holds a source's content hash, size or classes
    for rec in store.audit_log():
        assert "22" * 32 not in str(rec) and "content_hash" not in rec["details"]
    with pytest.raises(StoreError):
        store.add_source("bad\nid", content_hash="x", n=1, classes=[])


def test_unknown_ids_give_short_errors(store):
    store.add_source("s2", content_hash="22" * 32, n=1, classes=[0])
    with pytest.raises(StoreError) as e:
        store.source("x")
    assert str(e.value) == "unknown source 'x'; known: s1, s2"
    _put(store, "c1")
    with pytest.raises(StoreError) as e:
        store.load_compartment("zz", backbone_hash=BB)
    assert str(e.value) == "unknown compartment 'zz'; known: c1"
    for call in (lambda: store.compartment("zz"), lambda: store.remove_compartment("zz", reason="r")):
        with pytest.raises(StoreError, match="^unknown compartment 'zz'; known: c1$"):
            call()
    with pytest.raises(StoreError, match="^unknown source 'nope'; known: s1, s2$"):
        _put(store, "c2", sources=["s1", "nope"])
    for call in (lambda: store.forget_source("nope", reason="r"), lambda: store.compartments_of("nope"),
                 lambda: store.tags("nope"), lambda: store.set_tags("nope", [])):
        with pytest.raises(StoreError, match="^unknown source 'nope'"):
            call()
    for i in range(20):
        store.add_source(f"src{i:02d}", content_hash="00", n=1, classes=[0])
    with pytest.raises(StoreError) as e:
        store.source("x")
    assert len(str(e.value)) < 120 and "(14 more)" in str(e.value)
    with pytest.raises(StoreError, match="bad compartment id"):
        _put(store, "../escape")


# ------------------------------------------------------------------------------------------------ put / load


def test_put_load_round_trip(store):
    tensors = _tensors(3)
    row = store.put_compartment("c1", tensors, {"steps": 100, "note": "hi"}, kind="compartment", sources=["s1"],
                                backbone_hash=BB, actor="alice")
    folder = store.path / "compartments" / "c1"
    assert row["weights_sha256"] == file_sha256(folder / PROMPTS_NAME)
    assert row["manifest_sha256"] == file_sha256(folder / MANIFEST_NAME)
    assert row["sources"] == ["s1"] and row["kind"] == "compartment" and row["backbone_hash"] == BB

    loaded, manifest = store.load_compartment("c1", backbone_hash=BB)
    assert loaded.keys() == tensors.keys()
    for k, t in tensors.items():
        assert loaded[k].dtype == t.dtype and torch.equal(loaded[k], t)
    assert state_dict_sha256(loaded) == state_dict_sha256(tensors)
    assert manifest["steps"] == 100 and manifest["note"] == "hi"
    assert manifest["weights_sha256"] == row["weights_sha256"] and manifest["backbone_hash"] == BB
    assert manifest["cid"] == "c1" and manifest["sources"] == ["s1"]
    assert store.compartment("c1")["manifest"] == manifest == row["manifest"]
    put = store.audit_log()[-1]
    assert (put["action"], put["target"], put["actor"]) == ("put", "c1", "alice")
    assert put["before_hash"] is None and put["after_hash"] == row["weights_sha256"]
    assert store.verify() == []


def test_overwrite_and_listing(store):
    store.add_source("s2", content_hash="22" * 32, n=5, classes=[3])
    first = _put(store, "c1", 1)
    second = _put(store, "c1", 2)
    assert first["weights_sha256"] != second["weights_sha256"]
    loaded, manifest = store.load_compartment("c1", backbone_hash=BB)
    assert torch.equal(loaded["prompts"], _tensors(2)["prompts"]) and manifest["seed"] == 2
    rec = store.audit_log()[-1]
    assert rec["before_hash"] == first["weights_sha256"] and rec["after_hash"] == second["weights_sha256"]
    assert rec["details"]["replaced"] is True
    assert sorted(p.name for p in (store.path / "compartments").iterdir()) == ["c1"]  # no tmp/old leftovers

    _put(store, "c2", sources=["s2"])
    _put(store, "p12", kind="paragon", sources=["s1", "s2"])
    _put(store, "r12", kind="router", sources=["s2", "s1"])
    assert [r["cid"] for r in store.compartments()] == ["c1", "c2", "p12", "r12"]
    assert [r["cid"] for r in store.compartments(kind="paragon")] == ["p12"]
    assert [r["cid"] for r in store.compartments(kind="router")] == ["r12"]
    assert [r["cid"] for r in store.compartments_of("s1")] == ["c1", "p12", "r12"]
    assert [r["cid"] for r in store.compartments_of("s2")] == ["c2", "p12", "r12"]
    assert store.compartment("r12")["sources"] == ["s2", "s1"]
    assert store.verify() == []

    removed = store.remove_compartment("c2", reason="retired", actor="bob")
    assert removed["cid"] == "c2" and not (store.path / "compartments" / "c2").exists()
    rec = store.audit_log()[-1]
    assert (rec["action"], rec["target"], rec["before_hash"], rec["after_hash"]) == (
        "remove", "c2", removed["weights_sha256"], None)
    assert [r["cid"] for r in store.compartments()] == ["c1", "p12", "r12"]
    assert store.verify() == []


def test_tampered_weights_are_refused_and_reported(store, tmp_path):
    row = _put(store, "c1")
    weights = store.path / "compartments" / "c1" / PROMPTS_NAME
    original = weights.read_bytes()
    data = bytearray(original)
    data[-3] ^= 0x01  # one bit in the tensor bytes: still a valid safetensors file
    weights.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match=r"prompts\.safetensors does not match its manifest hash"):
        store.load_compartment("c1", backbone_hash=BB)
    problems = store.verify()
    assert len(problems) == 1 and "'c1'" in problems[0] and "does not match" in problems[0]

    manifest = store.path / "compartments" / "c1" / MANIFEST_NAME
    weights.write_bytes(original)
    assert store.verify() == []
    manifest.write_text(manifest.read_text().replace(BB, OTHER_BB))
    with pytest.raises(WeightsError, match="manifest.json does not match its registry hash"):
        store.load_compartment("c1", backbone_hash=BB)

    # opening the store again drops the damaged compartment, with an audit record
    store.close()
    with Store.open(store.path) as st:
        assert st.compartments() == [] and st.verify() == []
        assert any("dropped compartment 'c1'" in line for line in st.recovered)
        rec = st.audit_log()[-1]
        assert rec["action"] == "recover" and rec["target"] == "c1" and rec["before_hash"] == row["weights_sha256"]


def test_other_backbone_is_refused(store):
    _put(store, "c1")
    with pytest.raises(WeightsError) as e:
        store.load_compartment("c1", backbone_hash=OTHER_BB)
    msg = str(e.value)
    assert msg == f"compartment 'c1' was trained on backbone {BB[:8]}..., this backbone is {OTHER_BB[:8]}..."


@pytest.mark.parametrize("flavour", ["pickle", "torch.save"])
def test_pickled_weights_are_refused(store, flavour):
    _put(store, "c1")
    if flavour == "pickle":
        blob = pickle.dumps({"prompts": [1.0, 2.0]}, protocol=4)  # written, never loaded
    else:
        buf = io.BytesIO()
        torch.save({"prompts": torch.zeros(3)}, buf)
        blob = buf.getvalue()
    (store.path / "compartments" / "c1" / PROMPTS_NAME).write_bytes(blob)
    with pytest.raises(WeightsError, match="pickle"):
        store.load_compartment("c1", backbone_hash=BB)
    assert any("does not match" in p for p in store.verify())


# ------------------------------------------------------------------------------------------------ forgetting


def _assert_no_trace(root: Path, needles: list[str], raw_needles: list[bytes] = ()) -> None:
    """No needle anywhere under ``root`` (paths, bytes of every file) except in audit rows of the registry."""
    db_path = root / REGISTRY_NAME
    for f in sorted(root.rglob("*")):
        rel = f.relative_to(root).as_posix()
        for n in needles:
            assert n not in rel, (n, rel)
        if f.is_file() and f != db_path:
            data = f.read_bytes()
            for n in [x.encode() for x in needles] + list(raw_needles):
                assert n not in data, (n, rel)
    con = sqlite3.connect(str(db_path))
    try:
        tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        for table in tables:
            if table != "audit":
                dump = repr(con.execute(f'SELECT * FROM "{table}"').fetchall())
                for n in needles:
                    assert n not in dump, (n, table)
        audit_text = "\n".join(repr(row) for row in con.execute("SELECT * FROM audit"))
    finally:
        con.close()
    raw = db_path.read_bytes()
    for n in needles:  # every copy left in the file is one of the audit log's (secure_delete + VACUUM)
        assert raw.count(n.encode()) <= audit_text.count(n), n
    for n in raw_needles:
        assert n not in raw


def test_forget_source_leaves_no_trace(tmp_path):
    alpha, beta = "src-alpha-3f9d", "src-beta-b81c"
    a_cmp, b_cmp, joint, router = "alpha-cmp-5e1a", "beta-cmp-c4d0", "joint-cmp-77c2", "route-cmp-0d3b"
    a_content = "c0ffee" * 10 + "a1a1"
    with Store.create(tmp_path / "store") as st:
        st.add_source(alpha, content_hash=a_content, n=30, classes=[0, 1], tags=["protected"], actor="owner")
        st.add_source(beta, content_hash="be" * 32, n=20, classes=[2], actor="owner")
        a_row = st.put_compartment(a_cmp, _tensors(11), {"note": f"trained on {alpha}"}, kind="compartment",
                                   sources=[alpha], backbone_hash=BB, actor="owner")
        b_row = _put(st, b_cmp, 12, sources=[beta])
        j_row = _put(st, joint, 13, sources=[alpha, beta], kind="paragon")
        r_row = _put(st, router, 14, sources=[beta, alpha], kind="router")
        b_bytes = (st.path / "compartments" / b_cmp / PROMPTS_NAME).read_bytes()
        (st.work_dir(a_cmp) / "ckpt.safetensors").write_bytes(b"resumable state of " + alpha.encode())
        (st.work_dir("alpha-next-91aa", sources=[alpha]) / "ckpt.bin").write_bytes(b"in training")
        (st.work_dir("beta-next-22bb", sources=[beta]) / "ckpt.bin").write_bytes(b"in training")
        a_raw = _tensors(11)["prompts"].numpy().tobytes()[:64]
        st.samples_file(alpha, create=True).write_bytes(b"the samples of " + alpha.encode())
        lat_raw = b"latent mode: cached latents of " + alpha.encode() + b" under an autoencoder"
        st.latents_file(alpha, content_hash=a_content, autoencoder_hash="ae" * 32).write_bytes(lat_raw)

        out = st.forget_source(alpha, reason="owner withdrew consent", actor="dpo")

        assert out["source"] == alpha
        assert out["removed"] == sorted([a_cmp, joint, router])
        assert out["retrain"] == [{"cid": joint, "kind": "paragon", "sources": [beta]},
                                  {"cid": router, "kind": "router", "sources": [beta]}]
        assert out["work_removed"] == sorted([a_cmp, "alpha-next-91aa", f"data.{alpha}"])  # samples, latents
        assert [s["id"] for s in st.sources()] == [beta]
        assert [r["cid"] for r in st.compartments()] == [b_cmp]
        assert st.verify() == []
        # b's own compartment and training state are untouched
        assert st.compartment(b_cmp)["weights_sha256"] == b_row["weights_sha256"]
        assert (st.path / "compartments" / b_cmp / PROMPTS_NAME).read_bytes() == b_bytes
        st.load_compartment(b_cmp, backbone_hash=BB)
        assert (st.path / "work" / "beta-next-22bb" / "ckpt.bin").exists()

        rec = st.audit_log()[-1]
        assert (rec["action"], rec["target"], rec["actor"], rec["after_hash"]) == ("forget-source", alpha, "dpo", None)
        removed_hashes = {a_row["weights_sha256"], j_row["weights_sha256"], r_row["weights_sha256"]}
        assert set(rec["before_hash"].split(",")) == removed_hashes
        assert {r["weights_sha256"] for r in rec["details"]["removed"]} == removed_hashes
        assert rec["details"]["retrain"] == out["retrain"] and rec["details"]["reason"] == "owner withdrew consent"
        assert rec["seq"] == out["audit_seq"]

        # scan the store while it is still open, right after forgetting
        needles = [alpha, a_cmp, joint, router, a_content, *removed_hashes]
        _assert_no_trace(st.path, needles, raw_needles=[a_raw, lat_raw])
        # the audit rows are where they survive (checked through SQL), minus any data-derived content
        audit = st.audit_log()
        assert any(r["target"] == alpha for r in audit) and any(r["target"] == a_cmp for r in audit)
        assert all(a_content not in repr(r) for r in audit)
        assert all(r["action"] != "add-source" or set(r["details"]) == {"tags"} for r in audit)
    _assert_no_trace(tmp_path / "store", needles, raw_needles=[a_raw])  # and after closing


def test_recover_rolls_interrupted_writes_back_and_forward(store):
    cdir = store.path / "compartments"
    v1 = _put(store, "c1", 1)
    _put(store, "c2", 2)
    _put(store, "c3", 3)
    store.close()
    # c1: crashed after the old copy was moved aside, before the new one was renamed into place
    os.rename(cdir / "c1", cdir / ".old-0123456789ab-c1")
    (cdir / ".tmp-aaaaaaaaaaaa").mkdir()
    (cdir / ".tmp-aaaaaaaaaaaa" / PROMPTS_NAME).write_bytes(b"half written")
    # c2: crashed after the new copy was renamed into place, before the registry commit
    shutil.copytree(cdir / "c2", cdir / ".old-ba9876543210-c2")
    (cdir / "c2" / PROMPTS_NAME).write_bytes(b"uncommitted new version")
    # c3: crashed after the commit, before the old copy was deleted
    (cdir / ".old-111111111111-c3").mkdir()
    (cdir / ".old-111111111111-c3" / MANIFEST_NAME).write_text("{}")
    # a write of a new compartment that never committed
    (cdir / "ghost").mkdir()
    (cdir / "ghost" / PROMPTS_NAME).write_bytes(b"x")
    with Store.open(store.path) as st:
        assert len(st.recovered) == 5, st.recovered
        assert st.verify() == []
        assert sorted(p.name for p in cdir.iterdir()) == ["c1", "c2", "c3"]
        assert st.compartment("c1")["weights_sha256"] == v1["weights_sha256"]
        for cid, seed in (("c1", 1), ("c2", 2), ("c3", 3)):
            tensors, manifest = st.load_compartment(cid, backbone_hash=BB)
            assert manifest["seed"] == seed and torch.equal(tensors["prompts"], _tensors(seed)["prompts"])
        # a row whose files vanished is dropped, with an audit record
        shutil.rmtree(cdir / "c3")
        assert st.verify() == ["compartment 'c3': its directory is missing"]
    with Store.open(store.path) as st:
        assert [r["cid"] for r in st.compartments()] == ["c1", "c2"] and st.verify() == []
        assert st.audit_log()[-1]["action"] == "recover"


def test_work_dirs(store):
    w = store.work_dir("c1")
    assert w == store.path / "work" / "c1" and w.is_dir()
    (w / "state.safetensors").write_bytes(b"x")
    assert store.clear_work("c1") is True and not w.exists()
    assert store.clear_work("c1") is False
    with pytest.raises(StoreError, match="unknown source 'zz'"):
        store.work_dir("c1", sources=["zz"])
    _put(store, "c1")
    (store.work_dir("c1", sources=["s1"]) / "state").write_bytes(b"x")
    store.remove_compartment("c1", reason="done")
    assert not (store.path / "work" / "c1").exists()


# ------------------------------------------------------------------------------------------------ kill -9

_HELPER = r'''
"""Forks one worker per command line on stdin (torch is imported once); reports its pid, then how it ended."""
import os, shutil, sys, traceback
import numpy as np
import torch
torch.set_num_threads(1)
from cdm.store import Store

BB = "ab" * 32


def tensors(rng):  # about 100 KB
    return {"prompts": torch.from_numpy(rng.standard_normal((25, 1000), dtype=np.float32)),
            "ids": torch.from_numpy(rng.integers(0, 1000, size=(16,)))}


def random_puts(root, seed):
    rng = np.random.default_rng(seed)
    store = Store.open(root)
    i = 0
    while True:
        store.put_compartment(f"c{i % 5}", tensors(rng), {"seed": seed, "i": i}, kind="compartment",
                              sources=["s"], backbone_hash=BB, actor="kill-test")
        i += 1


def crash_before_event(k):
    """os._exit at the k-th file-system step (rename, replace, fsync, unlink, rmtree) from now on."""
    count = [0]
    def hook(mod, name):
        real = getattr(mod, name)
        def hooked(*a, **kw):
            if count[0] == k:
                os._exit(77)
            count[0] += 1
            return real(*a, **kw)
        setattr(mod, name, hooked)
    for mod, name in ((os, "rename"), (os, "replace"), (os, "fsync"), (os, "unlink"), (shutil, "rmtree")):
        hook(mod, name)


def one_op(root, op, k):
    store = Store.open(root)
    rng = np.random.default_rng(1000 + k)
    crash_before_event(k)
    if op == "put-over":
        store.put_compartment("c0", tensors(rng), {"version": k}, kind="compartment", sources=["s"],
                              backbone_hash=BB, actor="crash-test")
    elif op == "put-new":
        store.put_compartment(f"n{k}", tensors(rng), {"version": k}, kind="compartment", sources=["s"],
                              backbone_hash=BB, actor="crash-test")
    elif op == "forget":
        store.forget_source("fsrc-9b1e", reason="crash test", actor="crash-test")
    elif op == "remove":
        store.remove_compartment("crm", reason="crash test", actor="crash-test")


for line in sys.stdin:
    cmd, root, *args = line.split()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            if cmd == "random":
                random_puts(root, int(args[0]))
            else:
                one_op(root, args[0], int(args[1]))
                code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    print(pid, flush=True)
    _, status = os.waitpid(pid, 0)
    code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else -1
    sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0
    print("exit", code, sig, flush=True)
'''


class _Helper:
    """A helper process that imports torch once and forks a worker per command."""

    def __init__(self, folder: Path):
        script = folder / "store_helper.py"
        script.write_text(_HELPER)
        self.log = folder / "helper.log"
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        self._log_f = open(self.log, "wb")
        self.proc = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._log_f, bufsize=0, env=env)
        self._buf = b""

    def _line(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"store helper silent for {timeout} s; log:\n{self.log.read_text()}")
            ready, _, _ = select.select([self.proc.stdout], [], [], left)
            if ready:
                chunk = os.read(self.proc.stdout.fileno(), 4096)
                if not chunk:
                    raise AssertionError(f"store helper exited; log:\n{self.log.read_text()}")
                self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode()

    def run(self, command: str, kill_after: float | None = None) -> tuple[int, int]:
        """Run one worker; SIGKILL it after ``kill_after`` seconds. Returns (exit code, signal)."""
        self.proc.stdin.write((command + "\n").encode())
        pid = int(self._line(120))
        if kill_after is not None:
            time.sleep(kill_after)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        _, code, sig = self._line(60).split()
        return int(code), int(sig)

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log_f.close()


@pytest.fixture(scope="module")
def helper(tmp_path_factory):
    h = _Helper(tmp_path_factory.mktemp("helper"))
    yield h
    h.close()


def _check_consistent(root: Path) -> dict[str, dict]:
    """Open (which recovers), then: verify() is clean and every compartment loads with its recorded hash."""
    with Store.open(root) as st:
        assert st.verify() == []
        out = {}
        for row in st.compartments():
            tensors, manifest = st.load_compartment(row["cid"], backbone_hash=BB)
            folder = root / "compartments" / row["cid"]
            assert file_sha256(folder / PROMPTS_NAME) == row["weights_sha256"] == manifest["weights_sha256"]
            out[row["cid"]] = manifest
        return out


def test_kill9_during_writes_leaves_a_consistent_store(tmp_path, helper):
    root = tmp_path / "store"
    with Store.create(root) as st:
        st.add_source("s", content_hash="00" * 32, n=1, classes=[0])
    rng = np.random.default_rng(20240607)
    seen: set[str] = set()
    puts = 0
    for round_ in range(20):  # 8 rounds, more only on a machine too loaded for the workers to get anything done
        if round_ >= 8 and puts >= 3:
            break
        code, sig = helper.run(f"random {root} {round_}", kill_after=float(rng.uniform(0.05, 0.5)) * (1 + round_ // 8))
        assert sig == signal.SIGKILL, f"worker ended by itself (exit {code}); log:\n{helper.log.read_text()}"
        seen |= set(_check_consistent(root))
        with Store.open(root) as st:
            puts = sum(r["action"] == "put" for r in st.audit_log())
    assert puts >= 3 and seen  # the workers really wrote (and overwrote) compartments between kills


def test_crash_at_every_step_of_every_operation(tmp_path, helper):
    root = tmp_path / "store"
    forget, joint = "fsrc-9b1e", "joint-f-s"
    with Store.create(root) as st:
        st.add_source("s", content_hash="00" * 32, n=1, classes=[0])
        st.put_compartment("c0", _tensors(0), {"version": -1}, kind="compartment", sources=["s"], backbone_hash=BB)

    def setup(op: str) -> None:
        with Store.open(root) as st:
            if op == "forget" and forget not in {s["id"] for s in st.sources()}:
                st.add_source(forget, content_hash="ff" * 32, n=1, classes=[0])
                _put(st, "cf", 5, sources=[forget])
                _put(st, joint, 6, sources=["s", forget], kind="paragon")
                (st.work_dir("cf-next", sources=[forget]) / "ckpt").write_bytes(b"state")
            if op == "remove" and "crm" not in {r["cid"] for r in st.compartments()}:
                _put(st, "crm", 7, sources=["s"])

    for op in ("put-over", "put-new", "forget", "remove"):
        crashes = 0
        for k in range(60):
            setup(op)
            before = _check_consistent(root)
            with Store.open(root) as st:
                c0_hash = st.compartment("c0")["weights_sha256"]
            code, sig = helper.run(f"crash {root} {op} {k}")
            log = helper.log.read_text()
            assert (code, sig) in ((77, 0), (0, 0)), f"{op} step {k}: exit {code}, signal {sig}\n{log}"
            after = _check_consistent(root)
            assert "c0" in after  # never lost, whatever the step
            if op == "put-over":
                assert after["c0"]["version"] in (before["c0"]["version"], k)
            else:
                with Store.open(root) as st:
                    assert st.compartment("c0")["weights_sha256"] == c0_hash
            if op == "put-new":
                assert f"n{k}" not in after or after[f"n{k}"]["version"] == k
                if code == 0:
                    assert f"n{k}" in after
            if op == "forget":
                with Store.open(root) as st:
                    still = forget in {s["id"] for s in st.sources()}
                assert ("cf" in after) == (joint in after) == still, (k, sorted(after))
                if not still:
                    _assert_no_trace(root, [forget, "cf-next", joint])
            if op == "remove":
                assert "crm" not in after or after["crm"]["seed"] == 7
            if code == 0:
                break
            crashes += 1
        else:
            pytest.fail(f"{op} never completed")
        assert crashes >= 5, (op, crashes)  # the operation really was cut at several steps


# ----------------------------------------------------------------------------------------------- the store's backbone


def test_the_backbone_is_a_property_of_the_store(tmp_path):
    with Store.create(tmp_path / "st", backbone_hash=BB, backbone_ref="shipped:backbone") as st:
        assert st.backbone == {"hash": BB, "ref": "shipped:backbone"}
        st.add_source("s1", content_hash="11" * 32, n=1, classes=[0])
        with pytest.raises(StoreError, match=f"{OTHER_BB[:8]}.*{BB[:8]}"):
            st.put_compartment("s1", _tensors(), {}, kind="compartment", sources=["s1"], backbone_hash=OTHER_BB)
        with pytest.raises(StoreError, match=f"{OTHER_BB[:8]}.*{BB[:8]}"):
            st.set_backbone(OTHER_BB)
        assert st.compartments() == [] and not [p for p in (tmp_path / "st" / "compartments").iterdir()]
        _put(st, "s1")
    with pytest.raises(StoreError, match="created with backbone"):
        Store.create(tmp_path / "st", backbone_hash=OTHER_BB)
    with Store.create(tmp_path / "plain") as st:  # a store made without one takes its first compartment's
        assert st.backbone is None
        st.add_source("s1", content_hash="11" * 32, n=1, classes=[0])
        _put(st, "s1")
        assert st.backbone == {"hash": BB, "ref": None}
        with pytest.raises(StoreError, match="created with backbone"):
            st.put_compartment("x", _tensors(), {}, kind="router", sources=["s1"], backbone_hash=OTHER_BB)


def test_a_version_1_registry_is_migrated_on_open(tmp_path):
    root = tmp_path / "st"
    with Store.create(root) as st:
        st.add_source("s1", content_hash="11" * 32, n=1, classes=[0])
        _put(st, "s1")
    con = sqlite3.connect(root / REGISTRY_NAME)  # take it back to schema 1, as cdm 0.1 wrote it
    con.executescript("DROP TABLE meta; ALTER TABLE sources DROP COLUMN complete; PRAGMA user_version=1;")
    con.close()
    with Store.open(root) as st:
        assert st.backbone == {"hash": BB, "ref": None}  # read from its compartments
        assert st.sources()[0]["complete"] is True and st.verify() == []
    con = sqlite3.connect(root / REGISTRY_NAME)
    assert con.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    con.close()


@pytest.mark.parametrize("name", ["../evil", "a/../b", "a b", "..", "", ".x", "-x", "paragon", "router",
                                 "noisy-classifier", "s.head", "data.s", "x" * 129])
def test_source_names_follow_the_compartment_id_rule(name):
    with pytest.raises(StoreError, match="bad source name"):
        check_source_name(name)


def test_a_pending_source_is_incomplete_until_its_compartment_is_stored(store):
    store.add_source("p", content_hash="12" * 32, n=1, classes=[0], pending=True)
    assert store.source("p")["complete"] is False
    assert [p for p in store.verify() if "'p' is incomplete" in p]
    store.put_compartment("p", _tensors(), {}, kind="compartment", sources=["p"], backbone_hash=BB)
    assert store.source("p")["complete"] is True and store.verify() == []
