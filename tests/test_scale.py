"""Scale-out: `cdm add-many` (sequential = `cdm add`, every check before the first write, resume, heads, DP through
the same task function) and, in a loopback-only network namespace, Ray = sequential bit for bit with a worker
killed mid-task, and an strace of the whole run that contacts nothing but loopback.

The Ray test runs this file as a child process inside `unshare -n` (only `lo`, up), so Ray can never reach the
network from a test run; it is skipped, saying why, without root, unshare/ip or ray."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cdm.backbone import Backbone, UViT, UViTConfig
from cdm.cli.main import app
from cdm.compartments import CompartmentConfig
from cdm.data import public_protected, split_stratified
from cdm.errors import CdmError
from cdm.operations import add_source
from cdm.privacy import DPConfig
from cdm.scale.executor import ExecutorConfig
from cdm.scale.many import add_many, parse_named_spec
from cdm.scale.ray_env import (BOOTSTRAP_CONFIG, foreign_addresses, have_netns_tools, loopback_only_argv, ray_home,
                               strace_argv)
from cdm.store import Store, StoreError

CFG = CompartmentConfig(steps=4, batch_size=8, n_prompts=2, checkpoint_every=2, warmup=1, validation=0.0)
RAY_CFG = CFG
DP = DPConfig(epsilon=50.0)
SEQ = ExecutorConfig(executor="sequential")


def _tiny_backbone():
    torch.manual_seed(0)
    return Backbone(UViT(UViTConfig(img_size=14, patch_size=7, embed_dim=16, depth=1, num_heads=2))).freeze()


def _parts(k=3):
    _, protected = public_protected()
    small = protected.subset(np.arange(0, 4000, 50), id="mnist/protected/every50")
    return split_stratified(small, k)


@pytest.fixture(scope="module")
def parts():
    return _parts()


def _weights(st):
    return {r["cid"]: r["weights_sha256"] for r in st.compartments()}


def test_parse_named_spec():
    assert parse_named_spec("s0=glyphs:digits:500:seed=3/strat8-1") == ("s0", "glyphs:digits:500:seed=3/strat8-1")
    for bad in ("glyphs:digits:500:seed=3", "mnist/protected", "a b=mnist", "paragon=mnist"):
        with pytest.raises(CdmError, match="NAME=SPEC"):
            parse_named_spec(bad)


def test_executor_config_refusals():
    with pytest.raises(CdmError, match="unknown executor"):
        ExecutorConfig(executor="dask")
    with pytest.raises(CdmError, match="need --executor ray"):
        ExecutorConfig(executor="sequential", address="10.0.0.1:6379")
    with pytest.raises(CdmError, match=">= 1"):
        ExecutorConfig(threads=0)


def test_ray_environment_helpers(tmp_path):
    home = ray_home(tmp_path)
    assert (home / "ray_bootstrap_config.yaml").read_text() == BOOTSTRAP_CONFIG
    assert "type: local" in BOOTSTRAP_CONFIG and "head_ip: 127.0.0.1" in BOOTSTRAP_CONFIG
    argv = loopback_only_argv(["python", "x y.py"])
    assert argv[:3] == ["unshare", "-n", "sh"] and argv[4] == "ip link set lo up && exec python 'x y.py'"
    log = ('1 connect(3, {sa_family=AF_INET, sin_port=htons(6379), sin_addr=inet_addr("127.0.0.1")}, 16) = 0\n'
           '2 connect(4, {sa_family=AF_UNIX, sun_path="/tmp/ray/s"}, 110) = 0\n'
           '2 connect(4, {sa_family=AF_UNIX, sun_path="/var/run/nscd/socket"}, 110) = -1 ENOENT (No such file)\n')
    assert foreign_addresses(log) == []
    bad = '3 connect(5, {sa_family=AF_INET, sin_port=htons(80), sin_addr=inet_addr("169.254.169.254")}, 16) = -1'
    assert foreign_addresses(log + bad) == [bad]


def test_add_many_sequential_equals_add(tmp_path, backbone, parts):
    """The same compartments, bit for bit, as one `add` after another: plain and DP (one task function)."""
    for dp in (None, DP):
        named = [(f"s{i}", p) for i, p in enumerate(parts)][:1 if dp else 3]  # (a DP calibration takes seconds)
        with Store.create(tmp_path / f"add-{dp is not None}") as st:
            for name, p in named:
                add_source(st, backbone, p, name=name, cfg=CFG, progress=False, dp=dp)
            want = _weights(st)
        with Store.create(tmp_path / f"many-{dp is not None}") as st:
            out = add_many(st, backbone, named, cfg=CFG, ex=SEQ, dp=dp, progress=False)
            assert _weights(st) == want and sorted(out.stored) == [n for n, _ in named]
            assert all(s["complete"] and s["data_held"] for s in st.sources()) and st.verify() == []
            if dp is not None:
                assert st.compartment("s0")["manifest"]["dp"]["target_epsilon"] == DP.epsilon


def test_add_many_checks_everything_before_writing(tmp_path, backbone, parts):
    runner = CliRunner()
    bb_dir = tmp_path / "bb"
    backbone.save_pretrained(bb_dir)
    files = []
    for i, p in enumerate(parts):
        files.append(tmp_path / f"p{i}.npz")
        p.to_npz(files[-1])
    unlabelled = tmp_path / "u.npz"
    np.savez(unlabelled, images=parts[0].images)
    store = tmp_path / "st"
    opts = ["--store", str(store), "--backbone", str(bb_dir), "--steps", "4", "--batch-size", "8", "--prompts", "2",
            "--executor", "sequential"]
    # the last source cannot train a class-conditional compartment: refused before the store exists
    res = runner.invoke(app, ["add-many", f"a={files[0]}", f"b={files[1]}", f"c={unlabelled}", *opts])
    assert res.exit_code != 0 and "needs labels" in str(res.exception) and not store.exists()
    res = runner.invoke(app, ["add-many", f"a={files[0]}", f"a={files[1]}", *opts])
    assert res.exit_code != 0 and "given twice" in str(res.exception) and not store.exists()
    res = runner.invoke(app, ["add-many", f"a={files[0]}", f"b={files[1]}", *opts])
    assert res.exit_code == 0, res.output
    with Store.open(store) as st:
        first = _weights(st)
        n_audit = len(st.audit_log())
    # a name already stored is refused (nothing written), or skipped when it has the same content and config
    res = runner.invoke(app, ["add-many", f"c={files[2]}", f"a={files[0]}", *opts])
    assert res.exit_code != 0 and "already has a compartment" in str(res.exception)
    with Store.open(store) as st:
        assert len(st.audit_log()) == n_audit and "c" not in {s["id"] for s in st.sources()}
    specs = tmp_path / "specs.txt"
    specs.write_text(f"# three sources\na={files[0]}\n\nc={files[2]}\n")
    res = runner.invoke(app, ["add-many", f"b={files[1]}", "--specs-file", str(specs), "--skip-existing", *opts])
    assert res.exit_code == 0, res.output
    assert "skipped" in res.output
    with Store.open(store) as st:
        now = _weights(st)
        assert {k: now[k] for k in first} == first and set(now) == {"a", "b", "c"} and st.verify() == []


def test_add_many_isolated_heads_equal_train_heads(tmp_path, backbone, parts):
    from cdm.composition import HeadConfig
    from cdm.operations import train_heads

    hc = HeadConfig(steps=3, batch_size=8, eval_size=8)
    named = [("s0", parts[0]), ("s1", parts[1])]
    with Store.create(tmp_path / "a") as st:
        for name, p in named:
            add_source(st, backbone, p, name=name, cfg=CFG, progress=False)
        train_heads(st, backbone, None, "isolated", cfg=hc, progress=False)
        want = _weights(st)
    with Store.create(tmp_path / "b") as st:
        out = add_many(st, backbone, named, cfg=CFG, ex=SEQ, heads="isolated", head_cfg=hc, progress=False)
        assert sorted(out.heads) == ["s0.head", "s1.head"] and _weights(st) == want


# ------------------------------------------------------------------------------------------------ Ray (netns)
def _ray_missing() -> str | None:
    if importlib.util.find_spec("ray") is None:
        return "ray is not installed (pip install 'cdm[ray]')"
    return have_netns_tools()


@pytest.mark.skipif(_ray_missing() is not None, reason=str(_ray_missing()))
def test_ray_equals_sequential_with_a_worker_killed(tmp_path, backbone, parts):
    """Ray (embedded, 2 workers) stores the same compartments bit for bit as the sequential executor, although the
    worker training s1 is SIGKILLed mid-task (Ray retries it); DP compartments and isolated heads go through the
    same task function. All in a child process in a loopback-only network namespace, under strace when present:
    it must contact nothing but loopback."""
    from cdm.composition import HeadConfig

    hc = HeadConfig(steps=3, batch_size=8, eval_size=8)
    bb_dir = tmp_path / "bb"
    _tiny_backbone().save_pretrained(bb_dir)
    backbone = Backbone.from_pretrained(bb_dir)  # what the child loads
    for i, p in enumerate(parts):
        p.to_npz(tmp_path / f"p{i}.npz")
    child = [sys.executable, str(Path(__file__).resolve()), "ray-child", str(tmp_path)]
    traced = _which("strace")
    log = tmp_path / "strace.log"
    argv = loopback_only_argv(strace_argv(child, log) if traced else child)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "CDM_RAY_LOOPBACK_ONLY": "1"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    try:
        named = [(f"s{i}", p) for i, p in enumerate(parts)]
        want = {}  # the sequential executor's, computed here while the child runs
        for key, dp, heads in (("plain", None, "isolated"), ("dp", DP, "none")):
            with Store.create(tmp_path / f"seq-{key}") as st:
                add_many(st, backbone, named if dp is None else named[:1], cfg=RAY_CFG, ex=SEQ, dp=dp, heads=heads,
                         head_cfg=hc, progress=False)
                want[key] = _weights(st)
        output, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:  # (a failure above): the child's process group goes too
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, output[-5000:]
    got = json.loads((tmp_path / "ray.json").read_text())
    assert got["loopback_only"] is True
    assert got["weights"] == want, "Ray and sequential differ"
    assert got["killed"] == ["s1"] and got["attempts"]["plain"]["s1"] == 2
    assert got["executor"] == "ray" and got["parallel"] == 2
    if traced:
        assert foreign_addresses(log.read_text()) == []
    print(f"ray child: {time.perf_counter() - t0:.1f} s")


def _which(tool: str) -> bool:
    import shutil

    return shutil.which(tool) is not None


def _ray_child(tmp: Path) -> None:
    """In the loopback-only namespace: one Ray session, the plain run (s1's worker killed at step 2, then isolated
    heads) and the DP run; writes ray.json."""
    from cdm.composition import HeadConfig
    from cdm.data import load_npz
    from cdm.scale.executor import runner
    from cdm.scale.ray_env import loopback_only

    torch.set_num_threads(1)
    bb = Backbone.from_pretrained(tmp / "bb")
    named = [(f"s{i}", load_npz(tmp / f"p{i}.npz", id=f"mnist/protected/every50/strat3-{i}")) for i in range(3)]
    ex = ExecutorConfig(executor="ray", workers=2, kill_once=("s1", 2))
    hc = HeadConfig(steps=3, batch_size=8, eval_size=8)
    out = {"loopback_only": loopback_only(), "weights": {}, "attempts": {}}
    with runner(ex, bb) as session:
        for key, dp, heads in (("plain", None, "isolated"), ("dp", DP, "none")):
            with Store.create(tmp / f"ray-{key}") as st:
                many = add_many(st, bb, named if dp is None else named[:1], cfg=RAY_CFG, ex=ex, dp=dp, heads=heads,
                                head_cfg=hc, progress=False, session=session)
                assert not many.failures, many.failures
                out["weights"][key] = _weights(st)
                out["attempts"][key] = many.runs[0].attempts
                assert st.verify() == []
            if key == "plain":
                out["killed"] = many.runs[0].killed
        out["executor"], out["parallel"] = session.ex.executor, session.parallel
    (tmp / "ray.json").write_text(json.dumps(out))


def test_ray_session_refused_outside_the_namespace_when_required(monkeypatch):
    if importlib.util.find_spec("ray") is None:
        pytest.skip("ray is not installed")
    from cdm.scale.ray_env import loopback_only, ray_session

    if loopback_only():
        pytest.skip("this process is in a loopback-only namespace already")
    monkeypatch.setenv("CDM_RAY_LOOPBACK_ONLY", "1")
    with pytest.raises(CdmError, match="loopback-only network namespace"):
        with ray_session(1):
            pass


def test_store_refuses_samples_of_an_imported_source(tmp_path):
    with Store.create(tmp_path / "st") as st:
        st.add_source("far", content_hash="ab" * 32, n=3, classes=[0], data_held=False, pending=True)
        assert st.source("far")["data_held"] is False
        with pytest.raises(StoreError, match="holds no samples"):
            st.samples_file("far", create=True)
        assert any("`cdm import`" in p for p in st.verify())


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "ray-child":
    _ray_child(Path(sys.argv[2]))
