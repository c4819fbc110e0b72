"""Store operations end to end on a tiny backbone: add (continual), paragon, forget a sample (exact), forget a
source (no trace), wrong backbone refused; and the same through the CLI."""

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cdm.backbone import Backbone, UViT, UViTConfig
from cdm.cli.main import app
from cdm.compartments import CompartmentConfig
from cdm.data import public_protected, split_stratified
from cdm.errors import DataError, WeightsError
from cdm.io import state_dict_sha256
from cdm.operations import (add_source, forget_samples, forget_source, load_compartment, source_data,
                            train_paragon)
from cdm.store import Store, StoreError
from cdm.training.compartment import train_compartment

CFG = CompartmentConfig(steps=4, batch_size=8, n_prompts=2, checkpoint_every=2, warmup=1, validation=0.0)


@pytest.fixture(scope="module")
def parts():
    _, protected = public_protected()
    small = protected.subset(np.arange(0, 4000, 50), id="mnist/protected/every50")
    return split_stratified(small, 2)


def _weights(store, cid):
    return store.compartment(cid)["weights_sha256"]


def test_lifecycle(tmp_path, backbone, parts):
    with Store.create(tmp_path / "st") as st:
        add_source(st, backbone, parts[0], name="s0", cfg=CFG, tags=("public",), progress=False)
        h0 = _weights(st, "s0")
        add_source(st, backbone, parts[1], name="s1", cfg=CFG, progress=False)
        assert _weights(st, "s0") == h0  # continual: adding s1 leaves s0 unchanged
        with pytest.raises(StoreError, match="already has a compartment"):
            add_source(st, backbone, parts[1], name="s1", cfg=CFG, progress=False)
        train_paragon(st, backbone, cfg=CFG, progress=False)
        assert st.compartment("paragon")["sources"] == ["s0", "s1"]

        # forget two samples of s0: exact retrain, paragon dropped, audit written
        gone = [parts[0].sample_hashes[3], parts[0].sample_hashes[7][:12]]
        out = forget_samples(st, backbone, "s0", gone, reason="owner request", progress=False)
        direct, _ = train_compartment(backbone, parts[0].without(gone), CFG, progress=False)
        assert out.n_removed == 2 and out.dropped == ["paragon"]
        stored = load_compartment(st, backbone, "s0")
        assert state_dict_sha256(stored.tensors()) == state_dict_sha256(direct.tensors())
        assert len(source_data(st, "s0")) == len(parts[0]) - 2
        assert parts[0].sample_hashes[3] not in source_data(st, "s0").sample_hashes
        assert [r["cid"] for r in st.compartments()] == ["s0", "s1"]
        last = st.audit_log(limit=1)[0]
        assert last["action"] == "forget-samples" and last["before_hash"] == h0 and last["after_hash"] == out.after
        with pytest.raises(DataError):
            forget_samples(st, backbone, "s0", ["f" * 64], progress=False)  # unknown sample: nothing changes
        assert _weights(st, "s0") == out.after

        # forget s1: no file, row or byte of it remains (the audit log names it, nothing else)
        h_s0 = _weights(st, "s0")
        s1_weights = _weights(st, "s1")
        forget_source(st, "s1", reason="contract ended")
        assert _weights(st, "s0") == h_s0
        assert [s["id"] for s in st.sources()] == ["s0"]
        s1_sample = parts[1].images[0].tobytes()
    for f in (tmp_path / "st").rglob("*"):
        if f.is_file():
            data = f.read_bytes()
            assert s1_weights.encode() not in data or f.name.startswith("registry.sqlite")
            assert s1_sample not in data
            assert "s1" not in f.relative_to(tmp_path / "st").as_posix().split("/")
    with Store.open(tmp_path / "st") as st:
        assert st.verify() == []
        assert [a["action"] for a in st.audit_log()][-1] == "forget-source"


def test_wrong_backbone_is_refused(tmp_path, backbone, parts):
    with Store.create(tmp_path / "st") as st:
        add_source(st, backbone, parts[0], name="s0", cfg=CFG, progress=False)
        other = Backbone(UViT(UViTConfig(img_size=14, patch_size=7, embed_dim=16, depth=1, num_heads=2))).freeze()
        with pytest.raises(WeightsError, match="another backbone|trained on backbone"):
            load_compartment(st, other, "s0")


def test_cli_add_show_forget(tmp_path, backbone, parts):
    backbone.save_pretrained(tmp_path / "bb")
    parts[0].to_npz(tmp_path / "mine.npz")
    run = CliRunner().invoke
    common = ["--store", str(tmp_path / "st")]
    res = run(app, ["add", str(tmp_path / "mine.npz"), "--name", "mine", "--steps", "3", "--prompts", "2",
                    "--batch-size", "8", "--backbone", str(tmp_path / "bb"), *common])
    assert res.exit_code == 0, res.output
    res = run(app, ["sources", *common])
    assert res.exit_code == 0 and "mine" in res.output
    res = run(app, ["show", "mine", *common])
    assert res.exit_code == 0 and "backbone_hash" in res.output and "sample_hashes" in res.output
    res = run(app, ["forget", "mine", "--sample", parts[0].sample_hashes[0][:12], "--backbone", str(tmp_path / "bb"),
                    *common])
    assert res.exit_code == 0, res.output
    res = run(app, ["forget", "mine", *common])
    assert res.exit_code == 0, res.output
    res = run(app, ["audit", *common], env={"COLUMNS": "250"})
    assert "forget-source" in res.output and "forget-samples" in res.output


def test_cli_samples_a_compartment(tmp_path, backbone, parts):
    import numpy as np

    backbone.save_pretrained(tmp_path / "bb")
    with Store.create(tmp_path / "st") as st:
        add_source(st, backbone, parts[0], name="s0", cfg=CFG, progress=False)
    run = CliRunner().invoke
    args = ["sample", "--backbone", str(tmp_path / "bb"), "--per-class", "1", "--steps", "2", "--classes", "1,2"]
    assert run(app, [*args, "--out", str(tmp_path / "b")]).exit_code == 0
    res = run(app, [*args, "--out", str(tmp_path / "c"), "--store", str(tmp_path / "st"), "--sources", "s0"])
    assert res.exit_code == 0, res.output
    with np.load(tmp_path / "c" / "samples.npz") as c:
        assert c["images"].shape == (2, 28, 28) and c["labels"].tolist() == [1, 2]
    with Store.open(tmp_path / "st") as st:  # the compartment's denoiser is not the backbone's
        x, t, y = torch.randn(2, 1, 14, 14), torch.tensor([10, 900]), torch.tensor([1, 2])
        stored = load_compartment(st, backbone, "s0").denoiser(backbone)
        assert not torch.allclose(stored(x, t, y), backbone.eps(x, t, y=y))
    assert run(app, [*args, "--out", str(tmp_path / "d"), "--store", str(tmp_path / "st"), "--sources", "zz"]).exit_code


def test_cli_composes_sources(tmp_path, backbone, parts):
    import numpy as np

    backbone.save_pretrained(tmp_path / "bb")
    with Store.create(tmp_path / "st") as st:
        for j in range(2):
            add_source(st, backbone, parts[j], name=f"s{j}", cfg=CFG, progress=False)
    run = CliRunner().invoke
    args = ["sample", "--backbone", str(tmp_path / "bb"), "--store", str(tmp_path / "st"), "--sources", "s0,s1",
            "--steps", "4", "--out", str(tmp_path / "o")]
    res = run(app, [*args, "--n", "6", "--weighting", "ito", "--solver", "ddim"])
    assert res.exit_code != 0 and not (tmp_path / "o").exists()  # ito needs the stochastic solver: refused first
    res = run(app, [*args, "--n", "6", "--weighting", "ito", "--solver", "ddpm"])
    assert res.exit_code == 0, res.output
    with np.load(tmp_path / "o" / "weights.npz") as f:
        explicit = f["weights"]
        assert f["weights"].shape == (4, 6, 2) and f["sources"].tolist() == ["s0", "s1"]
        assert np.allclose(f["weights"].sum(-1), 1)
    # with its own defaults (weighting ito, no --solver) the command picks the solver ito needs, as the service does
    res = run(app, [*args, "--n", "6"])
    assert res.exit_code == 0, res.output
    with np.load(tmp_path / "o" / "weights.npz") as f:
        assert np.array_equal(f["weights"], explicit)
    res = run(app, [*args, "--per-class", "1", "--classes", "2,3", "--weighting", "naive", "--sparse", "0.01"])
    assert res.exit_code == 0, res.output


def test_interrupted_add_resumes_to_the_same_compartment(tmp_path, backbone, parts):
    with Store.create(tmp_path / "a") as st:
        add_source(st, backbone, parts[0], name="s0", cfg=CFG, progress=False)
        whole = _weights(st, "s0")
    with Store.create(tmp_path / "b") as st:
        paused = add_source(st, backbone, parts[0], name="s0", cfg=CFG, max_minutes=0.0, progress=False)
        assert not paused.finished and st.compartments() == []  # nothing half-trained is registered
        done = add_source(st, backbone, parts[0], name="s0", cfg=CFG, progress=False)
        assert done.finished and _weights(st, "s0") == whole
        assert not (st.path / "work" / "s0").exists()  # training state cleared once stored


def test_class_priors_follow_the_stored_samples(tmp_path, backbone, parts):
    from cdm.operations import compose

    with Store.create(tmp_path / "st") as st:
        for j, part in enumerate(parts):
            add_source(st, backbone, part, name=f"s{j}", cfg=CFG, progress=False)
        def prior():  # lambda_i(y) = n_i(y) / sum_j n_j(y), (sources, classes)
            d = compose(st, backbone, ["s0", "s1"], weighting="naive", class_conditional_priors=True)
            return d.class_log_prior.exp().numpy()

        counts = np.array([np.bincount(p.labels, minlength=10) for p in parts], dtype=float)
        np.testing.assert_allclose(prior(), counts / counts.sum(0))
        threes = [h for h, y in zip(parts[0].sample_hashes, parts[0].labels, strict=True) if y == 3]
        forget_samples(st, backbone, "s0", threes, progress=False)  # s0 no longer holds a 3: no weight for class 3
        after = prior()
        assert after[0, 3] == 0 and after[1, 3] == 1 and after[0, 2] == pytest.approx(counts[0, 2] / counts[:, 2].sum())


def test_unconditional_images_follow_the_sources_class_mixture(tmp_path, backbone, parts):
    from cdm.data import split_by_classes
    from cdm.errors import CdmError
    from cdm.operations import generate_from_store, mixture_labels

    groups = split_by_classes(parts[0], [[0, 1, 2], [7]])  # two sources holding disjoint classes
    with Store.create(tmp_path / "st") as st:
        for j, part in enumerate(groups):
            add_source(st, backbone, part, name=f"g{j}", cfg=CFG, progress=False)
        comps = [load_compartment(st, backbone, n) for n in ("g0", "g1")]
        drawn = mixture_labels(st, ["g0", "g1"], comps, 4000, seed=3)
        counts = np.bincount(np.concatenate([p.labels for p in groups]), minlength=10)
        np.testing.assert_allclose(np.bincount(drawn, minlength=10) / 4000, counts / counts.sum(), atol=0.03)
        assert set(drawn.tolist()) == {0, 1, 2, 7}
        kw = dict(n=6, weighting="ito", steps=2, seed=1)
        mix = generate_from_store(st, backbone, ["g0", "g1"], **kw)
        again = generate_from_store(st, backbone, ["g0", "g1"], **kw)
        assert set(mix.labels.tolist()) <= {0, 1, 2, 7} and np.array_equal(mix.images, again.images)
        assert mix.evals == 6 * 2  # class priors leave the one source holding each drawn class
        null = generate_from_store(st, backbone, ["g0", "g1"], unconditional="null", **kw)
        assert null.labels is None and null.evals == 2 * 6 * 2  # the null row: both sources, weighed by Ito
        # the paper's naive: data shares for every class, so both compartments are evaluated for a labelled row
        dense = generate_from_store(st, backbone, ["g0", "g1"], labels=[0, 7], weighting="naive", steps=2,
                                    class_priors=False)
        assert dense.evals == 2 * 2 * 2
        one = generate_from_store(st, backbone, ["g1"], **kw)  # one compartment: its own classes only
        assert set(one.labels.tolist()) == {7}
        with pytest.raises(CdmError, match="unconditional must be one of"):
            generate_from_store(st, backbone, ["g0", "g1"], unconditional="prior", **kw)


def test_attribute_samples_uses_each_sources_class_mixture(tmp_path, backbone, parts):
    from cdm.errors import CdmError
    from cdm.operations import attribute_samples

    low = parts[0].subset(np.flatnonzero(parts[0].labels < 3), id="low")  # classes 0-2 only
    high = parts[1].subset(np.flatnonzero(parts[1].labels >= 7), id="high")  # classes 7-9 only
    with Store.create(tmp_path / "st") as st:
        add_source(st, backbone, low, name="low", cfg=CFG, progress=False)
        add_source(st, backbone, high, name="high", cfg=CFG, progress=False)
        r = attribute_samples(st, backbone, ["low", "high"], n=3, steps=2)
        assert r.density == "class-mixture" and r.credit.shape == (3, 2) and r.weights.shape == (2, 3, 2)
        assert r.priors == [len(low), len(high)]
        row = attribute_samples(st, backbone, ["low", "high"], n=3, steps=2, density="prompt-row")
        assert row.density == "prompt-row" and not np.allclose(row.x0, r.x0)  # another density
        with pytest.raises(CdmError, match="unknown density"):
            attribute_samples(st, backbone, ["low", "high"], n=1, steps=1, density="mixture")
        add_source(st, backbone, parts[0], name="uncond", cfg=CompartmentConfig(**{**CFG.to_dict(),
                                                                                   "conditional": False}),
                   progress=False)
        assert attribute_samples(st, backbone, ["uncond"], n=1, steps=1).density == "prompt-row"
        with pytest.raises(CdmError, match="not class-conditional"):
            attribute_samples(st, backbone, ["uncond"], n=1, steps=1, density="class-mixture")


# ---------------------------------------------------------------------------------------------- the store's backbone


def _other_backbone(seed):
    torch.manual_seed(seed)
    return Backbone(UViT(UViTConfig(img_size=14, patch_size=7, embed_dim=16, depth=1, num_heads=2))).freeze()


def test_the_store_keeps_its_backbone_for_every_command(tmp_path, backbone, parts):
    """The backbone is a property of the store: recorded when `cdm add` creates it, used by `cdm forget --sample`
    without --backbone (the exact retrain stays exact), and another one is refused naming both hashes, before
    anything is written."""
    backbone.save_pretrained(tmp_path / "bb")
    other = _other_backbone(7)
    other.save_pretrained(tmp_path / "other")
    parts[0].to_npz(tmp_path / "a.npz")
    parts[1].to_npz(tmp_path / "b.npz")
    run = CliRunner().invoke
    st_dir = tmp_path / "st"
    train = ["--steps", "3", "--prompts", "2", "--batch-size", "8", "--store", str(st_dir)]
    res = run(app, ["add", str(tmp_path / "a.npz"), "--name", "a", "--backbone", str(tmp_path / "bb"), *train])
    assert res.exit_code == 0, res.output
    with Store.open(st_dir) as st:
        assert st.backbone == {"hash": backbone.hash, "ref": str((tmp_path / "bb").resolve())}
        before = st.compartment("a")["weights_sha256"]
    audit_before = len(Store.open(st_dir).audit_log())

    # another backbone, explicitly: refused with both hashes, nothing registered or trained
    for args in (["add", str(tmp_path / "b.npz"), "--name", "b", "--backbone", str(tmp_path / "other"), *train],
                 ["forget", "a", "--sample", parts[0].sample_hashes[0], "--backbone", str(tmp_path / "other"),
                  "--store", str(st_dir)],
                 ["paragon", "--backbone", str(tmp_path / "other"), "--steps", "3", "--store", str(st_dir)]):
        res = run(app, args)
        assert res.exit_code != 0
        assert backbone.hash[:12] in str(res.exception) and other.hash[:12] in str(res.exception), res.exception
    with Store.open(st_dir) as st:
        assert [s["id"] for s in st.sources()] == ["a"] and st.compartment("a")["weights_sha256"] == before
        assert len(st.audit_log()) == audit_before

    # no --backbone: the store's own, so forgetting a sample is the exact retrain on it
    gone = parts[0].sample_hashes[5]
    res = run(app, ["forget", "a", "--sample", gone, "--store", str(st_dir)])
    assert res.exit_code == 0, res.output
    cfg = CompartmentConfig(steps=3, n_prompts=2, batch_size=8, lr=0.1)
    direct, _ = train_compartment(backbone, parts[0].without([gone]), cfg, progress=False)
    with Store.open(st_dir) as st:
        row = st.compartment("a")
        assert row["backbone_hash"] == backbone.hash and row["manifest"]["backbone_hash"] == backbone.hash
        assert state_dict_sha256(load_compartment(st, backbone, "a").tensors()) == state_dict_sha256(direct.tensors())
    res = run(app, ["add", str(tmp_path / "b.npz"), "--name", "b", *train])  # no --backbone: the store's
    assert res.exit_code == 0, res.output


def test_operations_refuse_a_backbone_that_is_not_the_stores(tmp_path, backbone, parts):
    other = _other_backbone(8)
    with Store.create(tmp_path / "st", backbone_hash=backbone.hash) as st:
        for call in (lambda: add_source(st, other, parts[0], name="x", cfg=CFG, progress=False),
                     lambda: train_paragon(st, other, cfg=CFG, progress=False)):
            with pytest.raises(Exception, match=f"{other.hash[:12]}.*{backbone.hash[:12]}|"
                                                f"{backbone.hash[:12]}.*{other.hash[:12]}|no sources"):
                call()
        assert st.sources() == [] and not any((tmp_path / "st" / "work").iterdir())
        add_source(st, backbone, parts[0], name="s0", cfg=CFG, progress=False)
        with pytest.raises(Exception, match=other.hash[:12]):
            forget_samples(st, other, "s0", [parts[0].sample_hashes[0]], progress=False)
        assert len(source_data(st, "s0")) == len(parts[0])  # nothing was forgotten


# ---------------------------------------------------------------------------------------------- a failed add


@pytest.mark.parametrize("name", ["../evil", "a/../b", "a b", "..", ".hidden", "paragon", "x.head", "data.x"])
def test_a_bad_name_writes_nothing(tmp_path, backbone, parts, name):
    backbone.save_pretrained(tmp_path / "bb")
    parts[0].to_npz(tmp_path / "a.npz")
    run = CliRunner().invoke
    st_dir = tmp_path / "st"
    res = run(app, ["add", str(tmp_path / "a.npz"), "--name", name, "--steps", "2", "--backbone",
                    str(tmp_path / "bb"), "--store", str(st_dir)])
    assert res.exit_code != 0 and "bad source name" in str(res.exception)
    assert not st_dir.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["a.npz", "bb"]
    with Store.create(st_dir) as st:  # an existing store: nothing registered
        with pytest.raises(StoreError, match="bad source name"):
            add_source(st, backbone, parts[0], name=name, cfg=CFG, progress=False)
        assert st.sources() == [] and st.audit_log() == [] and list((st_dir / "work").iterdir()) == []


def test_an_unlabelled_folder_for_a_conditional_compartment_writes_nothing(tmp_path, backbone):
    from PIL import Image

    folder = tmp_path / "flat"
    folder.mkdir()
    for i in range(12):
        Image.fromarray(np.full((28, 28), 20 * i, dtype=np.uint8)).save(folder / f"{i}.png")
    backbone.save_pretrained(tmp_path / "bb")
    st_dir = tmp_path / "st"
    with Store.create(st_dir) as st:
        pass
    res = CliRunner().invoke(app, ["add", str(folder), "--name", "flat", "--steps", "2", "--backbone",
                                   str(tmp_path / "bb"), "--store", str(st_dir)])
    assert res.exit_code != 0 and "needs labels" in str(res.exception)
    with Store.open(st_dir) as st:
        assert st.sources() == [] and st.audit_log() == [] and list((st_dir / "work").iterdir()) == []
        assert st.backbone is None


def test_a_killed_add_is_listed_as_incomplete_and_resumes(tmp_path, backbone, parts):
    import os
    import signal
    import subprocess
    import sys
    import time

    backbone.save_pretrained(tmp_path / "bb")
    parts[0].to_npz(tmp_path / "a.npz")
    st_dir = tmp_path / "st"
    cmd = [sys.executable, "-m", "cdm", "add", str(tmp_path / "a.npz"), "--name", "a", "--steps", "3000",
           "--prompts", "2", "--batch-size", "8", "--backbone", str(tmp_path / "bb"), "--store", str(st_dir),
           "--threads", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (st_dir / "work" / "a").is_dir():  # registered, its samples stored, training started
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.5)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    with Store.open(st_dir) as st:
        assert [(s["id"], s["complete"]) for s in st.sources()] == [("a", False)]
        problems = st.verify()
        assert len(problems) == 1 and "source 'a' is incomplete" in problems[0] and "cdm forget a" in problems[0]
    res = CliRunner().invoke(app, ["sources", "--store", str(st_dir)], env={"COLUMNS": "200"})
    assert "incomplete" in res.output and "cdm forget a" in res.output
    res = CliRunner().invoke(app, ["forget", "a", "--store", str(st_dir)])  # the way out it names works
    assert res.exit_code == 0, res.output
    with Store.open(st_dir) as st:
        assert st.sources() == [] and st.verify() == []


def test_an_interrupted_add_is_incomplete_until_its_compartment_is_stored(tmp_path, backbone, parts):
    cfg = CompartmentConfig(steps=6, batch_size=8, n_prompts=2, checkpoint_every=2, warmup=1, validation=0.0)
    with Store.create(tmp_path / "st") as st:
        out = add_source(st, backbone, parts[0], name="a", cfg=cfg, max_minutes=0, progress=False)
        assert not out.finished and st.source("a")["complete"] is False
        assert any("incomplete" in p for p in st.verify())
        while not out.finished:
            out = add_source(st, backbone, parts[0], name="a", cfg=cfg, max_minutes=0, progress=False)
        assert st.source("a")["complete"] is True and st.verify() == []


# ---------------------------------------------------------------------------------------------- learnt nothing


def test_a_compartment_that_learnt_nothing_is_reported(tmp_path, parts):
    torch.manual_seed(0)  # three blocks: prompts can move the loss (with one, validation never improves)
    Backbone(UViT(UViTConfig(img_size=14, patch_size=7, embed_dim=16, depth=3, num_heads=2))).save_pretrained(
        tmp_path / "bb")
    parts[0].to_npz(tmp_path / "a.npz")
    parts[1].to_npz(tmp_path / "b.npz")
    run = CliRunner().invoke
    common = ["--store", str(tmp_path / "st")]
    # a learning rate too small to move the loss: validation keeps step 0, the compartment is the backbone
    res = run(app, ["add", str(tmp_path / "a.npz"), "--name", "still", "--steps", "4", "--prompts", "2",
                    "--batch-size", "8", "--lr", "1e-12", "--backbone", str(tmp_path / "bb"), *common])
    assert res.exit_code == 0, res.output
    assert "learnt nothing" in res.output
    res = run(app, ["add", str(tmp_path / "b.npz"), "--name", "moved", "--steps", "20", "--prompts", "2",
                    "--batch-size", "8", "--lr", "0.1", *common])
    assert res.exit_code == 0 and "learnt nothing" not in res.output, res.output
    with Store.open(tmp_path / "st") as st:
        assert st.compartment("still")["manifest"]["learned"] is False
        assert st.compartment("still")["manifest"]["validation"]["best_step"] == 0
        assert st.compartment("moved")["manifest"]["learned"] is True
    res = run(app, ["show", "still", *common])
    assert "learnt nothing" in res.output
    res = run(app, ["sources", *common], env={"COLUMNS": "200"})
    line = next(ln for ln in res.output.splitlines() if "still" in ln)
    assert "learnt nothing" in line
    assert "learnt nothing" not in next(ln for ln in res.output.splitlines() if "moved" in ln)


def test_cli_paragon_takes_its_compartments_config_and_budget(tmp_path, backbone, parts):
    backbone.save_pretrained(tmp_path / "bb")
    with Store.create(tmp_path / "st") as st:
        for j in range(2):
            add_source(st, backbone, parts[j], name=f"s{j}", cfg=CFG, progress=False)
    res = CliRunner().invoke(app, ["paragon", "--store", str(tmp_path / "st")])
    assert res.exit_code != 0 and "not shipped: pass --backbone DIR" in str(res.exception)  # made in memory
    res = CliRunner().invoke(app, ["paragon", "--store", str(tmp_path / "st"), "--backbone", str(tmp_path / "bb")])
    assert res.exit_code == 0, res.output
    with Store.open(tmp_path / "st") as st:
        cfg = CompartmentConfig.from_dict(st.compartment("paragon")["manifest"]["config"])
        assert cfg.steps == 2 * CFG.steps and cfg.n_prompts == CFG.n_prompts and cfg.batch_size == CFG.batch_size
        assert st.compartment("paragon")["sources"] == ["s0", "s1"]
