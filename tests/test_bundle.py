"""Compartment bundles: trained with no store where the data lives (`cdm train-compartment`), imported into a store
that never sees the data (`cdm import`): the round trip, every refusal before any write, `forget --sample` on an
imported source saying what the owner must do, re-import after the owner retrained, the audit trail."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cdm.backbone import Backbone, UViT, UViTConfig
from cdm.cli.main import app
from cdm.compartments import CompartmentConfig
from cdm.data import public_protected, split_stratified
from cdm.errors import CdmError
from cdm.io import file_sha256, state_dict_sha256
from cdm.operations import add_source, forget_source, load_compartment
from cdm.operations.sources import train_source
from cdm.scale.bundle import import_bundle, read_bundle, write_bundle
from cdm.store import Store, StoreError

CFG = CompartmentConfig(steps=4, batch_size=8, n_prompts=2, checkpoint_every=2, warmup=1, validation=0.0)


@pytest.fixture(scope="module")
def parts():
    _, protected = public_protected()
    small = protected.subset(np.arange(0, 4000, 50), id="mnist/protected/every50")
    return split_stratified(small, 2)


def _bundle(path, backbone, source, cfg=CFG, dp=None):
    comp, record = train_source(backbone, source, cfg, dp, progress=False)
    write_bundle(path, backbone, source, comp.tensors(), record, command="test")
    return comp


def _state(st):
    """What a refused import must leave unchanged."""
    return len(st.audit_log()), [s["id"] for s in st.sources()], [r["cid"] for r in st.compartments()]


def test_round_trip(tmp_path, backbone, parts):
    comp = _bundle(tmp_path / "b", backbone, parts[0])
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["manifest.json", "prompts.safetensors"]
    b = read_bundle(tmp_path / "b")
    m = b.manifest
    assert m["weights_sha256"] == file_sha256(tmp_path / "b" / "prompts.safetensors")
    assert m["backbone_hash"] == backbone.hash and m["config"] == CFG.to_dict() and m["seed"] == CFG.seed
    assert m["source"]["sample_hashes"] == sorted(parts[0].sample_hashes)
    assert m["source"]["content_hash"] == parts[0].content_hash and m["dp"] is None
    assert m["training"]["finished"] is True
    with Store.create(tmp_path / "st", backbone_hash=backbone.hash) as st:
        out = import_bundle(st, backbone, tmp_path / "b", name="far")
        assert not out.reimport and out.compartment.weights_sha256 == m["weights_sha256"]
        stored = load_compartment(st, backbone, "far")
        assert state_dict_sha256(stored.tensors()) == state_dict_sha256(comp.tensors())
        src = st.source("far")
        assert src["data_held"] is False and src["complete"] and src["n"] == len(parts[0])
        assert not (tmp_path / "st" / "work" / "data.far").exists()  # no samples, nothing derived from them
        log = st.audit_log()
        assert [a["action"] for a in log[-3:]] == ["add-source", "put", "import"]
        assert log[-3]["details"]["imported"] is True
        assert log[-1]["details"]["reimport"] is False and log[-1]["after_hash"] == m["weights_sha256"]
        assert st.verify() == []
        with pytest.raises(StoreError, match="imported from a compartment bundle"):
            from cdm.operations import source_data

            source_data(st, "far")
        # importing the same bundle again changes nothing
        n = len(st.audit_log())
        assert import_bundle(st, backbone, tmp_path / "b", name="far").compartment.weights_sha256 == m["weights_sha256"]
        assert len(st.audit_log()) == n


def _tamper(kind, path, backbone, parts, tmp_path):
    """A bundle at ``path`` made unimportable in one way."""
    if kind == "backbone":
        torch.manual_seed(1)
        other = Backbone(UViT(UViTConfig(img_size=14, patch_size=7, embed_dim=16, depth=1, num_heads=2))).freeze()
        _bundle(path, other, parts[0])
        return "trained on backbone"
    _bundle(path, backbone, parts[0])
    weights, manifest = path / "prompts.safetensors", path / "manifest.json"
    m = json.loads(manifest.read_text())
    if kind == "weights":
        data = bytearray(weights.read_bytes())
        data[-5] ^= 0xFF
        weights.write_bytes(bytes(data))
        return "does not match the manifest's weights_sha256"
    if kind == "config":
        m["config"]["lr"] = -1.0
        m["training"]["config"]["lr"] = -1.0
        manifest.write_text(json.dumps(m))
        return "invalid compartment config"
    if kind in ("shape", "nan", "pickle"):
        from cdm.io import save_state_dict

        t = {k: v.clone() for k, v in read_bundle(path).tensors.items()}
        if kind == "shape":
            t["prompts"] = torch.zeros(t["prompts"].shape[0], t["prompts"].shape[1] + 1)
        elif kind == "nan":
            t["prompts"][0, 0] = float("nan")
        if kind == "pickle":
            torch.save(t, weights)
        else:
            save_state_dict(weights, t)
        m["weights_sha256"] = file_sha256(weights)
        m["tensors"] = {k: {"shape": list(v.shape), "dtype": "F32"} for k, v in t.items()}
        manifest.write_text(json.dumps(m))
        return {"shape": "shape", "nan": "non-finite", "pickle": "pickle"}[kind]
    if kind == "unfinished":
        m["training"]["finished"] = False
        manifest.write_text(json.dumps(m))
        return "did not finish"
    if kind == "hashes":
        m["source"]["sample_hashes"] = m["source"]["sample_hashes"][:-1]
        manifest.write_text(json.dumps(m))
        return "sample hashes"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["backbone", "weights", "config", "shape", "nan", "pickle", "unfinished", "hashes"])
def test_refusals_write_nothing(tmp_path, backbone, parts, kind):
    with Store.create(tmp_path / "st", backbone_hash=backbone.hash) as st:
        add_source(st, backbone, parts[1], name="local", cfg=CFG, progress=False)
        before = _state(st)
        match = _tamper(kind, tmp_path / "b", backbone, parts, tmp_path)
        with pytest.raises(CdmError, match=match):
            import_bundle(st, backbone, tmp_path / "b", name="far")
        assert _state(st) == before and st.verify() == []


def test_import_refuses_a_source_added_with_its_data(tmp_path, backbone, parts):
    _bundle(tmp_path / "b", backbone, parts[0])
    with Store.create(tmp_path / "st", backbone_hash=backbone.hash) as st:
        add_source(st, backbone, parts[0], name="s", cfg=CFG, progress=False)
        before = _state(st)
        with pytest.raises(StoreError, match="added with its data"):
            import_bundle(st, backbone, tmp_path / "b", name="s")
        with pytest.raises(StoreError, match="bad source name"):
            import_bundle(st, backbone, tmp_path / "b", name="paragon")
        assert _state(st) == before


def test_forget_sample_refused_then_reimport_and_forget_source(tmp_path, backbone, parts):
    """The store cannot retrain an imported source: forget --sample says what the owner must do and changes
    nothing; the owner's retrained bundle re-imports (audit: how many samples it dropped); forget --source works."""
    runner = CliRunner()
    _bundle(tmp_path / "b1", backbone, parts[0])
    store = tmp_path / "st"
    with Store.create(store, backbone_hash=backbone.hash) as st:
        import_bundle(st, backbone, tmp_path / "b1", name="far", tags=("partner",))
        before = _state(st)
        w1 = st.compartment("far")["weights_sha256"]
    gone = [parts[0].sample_hashes[2], parts[0].sample_hashes[5]]
    bb_dir = tmp_path / "bb"
    backbone.save_pretrained(bb_dir)
    res = runner.invoke(app, ["forget", "far", "--store", str(store), "--sample", gone[0], "--sample", gone[1][:12],
                              "--backbone", str(bb_dir)])
    assert res.exit_code != 0
    msg = " ".join(str(res.exception).split())
    assert "does not hold its data" in msg and "cdm train-compartment" in msg and "cdm import" in msg
    assert "--name far" in msg and "nothing was changed" in msg
    with Store.open(store) as st:
        assert _state(st) == before and st.compartment("far")["weights_sha256"] == w1
    # the owner retrains without the samples, and the bundle is re-imported
    _bundle(tmp_path / "b2", backbone, parts[0].without(gone))
    with Store.open(store) as st:
        out = import_bundle(st, backbone, tmp_path / "b2", name="far")
        assert out.reimport and out.n_removed == 2 and out.n_added == 0
        assert st.source("far")["n"] == len(parts[0]) - 2 and st.source("far")["data_held"] is False
        assert st.tags("far") == ["partner"]
        log = st.audit_log()
        imports = [a for a in log if a["action"] == "import"]
        assert [a["details"]["reimport"] for a in imports] == [False, True]
        assert imports[-1]["details"]["n_removed"] == 2 and imports[-1]["before_hash"] == w1
        assert st.verify() == []
        forget_source(st, "far", reason="contract ended")
        assert st.sources() == [] and st.compartments() == []
        assert log[-1]["action"] == "import" and st.audit_log()[-1]["action"] == "forget-source"
    assert not list((store / "compartments").iterdir()) and not list((store / "work").iterdir())


def test_cli_train_compartment_and_import(tmp_path, backbone, parts):
    runner = CliRunner()
    bb_dir, data = tmp_path / "bb", tmp_path / "data.npz"
    backbone.save_pretrained(bb_dir)
    parts[0].to_npz(data)
    opts = ["--steps", "4", "--batch-size", "8", "--prompts", "2"]
    res = runner.invoke(app, ["train-compartment", str(data), "--backbone", str(bb_dir), "--out",
                              str(tmp_path / "b"), *opts, "--dp-epsilon", "50"])
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert m["dp"]["target_epsilon"] == 50 and m["dp"]["epsilon"] <= 50 and m["source"]["spec"] == str(data)
    res = runner.invoke(app, ["train-compartment", str(data), "--backbone", str(bb_dir), "--out",
                              str(tmp_path / "b"), *opts])
    assert res.exit_code != 0 and "not an empty directory" in str(res.exception)
    # into a new store: the bundle's backbone must be given (it is not shipped); a wrong one creates nothing
    res = runner.invoke(app, ["import", str(tmp_path / "b"), "--store", str(tmp_path / "st"), "--name", "far"])
    assert res.exit_code != 0 and "pass --backbone" in str(res.exception) and not (tmp_path / "st").exists()
    res = runner.invoke(app, ["import", str(tmp_path / "b"), "--store", str(tmp_path / "st"), "--name", "far",
                              "--backbone", str(bb_dir)])
    assert res.exit_code == 0, res.output
    with Store.open(tmp_path / "st") as st:
        assert st.compartment("far")["weights_sha256"] == m["weights_sha256"]
        assert st.compartment("far")["manifest"]["dp"]["epsilon"] == m["dp"]["epsilon"]
        assert st.audit_log()[-1]["details"]["dp"] is True
    res = runner.invoke(app, ["sources", "--store", str(tmp_path / "st")])
    assert res.exit_code == 0 and "imported" in res.output


def test_imported_sources_compose_with_their_class_counts(tmp_path, backbone, parts):
    """The store holds no samples of an imported source, so lambda_i(y) comes from the bundle's verified class
    counts: equal to what the same sources added with their data give."""
    from cdm.data import split_by_classes
    from cdm.operations import class_counts, generate_from_store

    groups = split_by_classes(parts[0], [[0, 1, 2], [3, 4, 5, 6, 7, 8, 9]])
    with Store.create(tmp_path / "far", backbone_hash=backbone.hash) as far, Store.create(tmp_path / "near") as near:
        for j, g in enumerate(groups):
            _bundle(tmp_path / f"b{j}", backbone, g)
            import_bundle(far, backbone, tmp_path / f"b{j}", name=f"g{j}")
            add_source(near, backbone, g, name=f"g{j}", cfg=CFG, progress=False)
        names = ["g0", "g1"]
        got = class_counts(far, names, [load_compartment(far, backbone, n) for n in names])
        want = class_counts(near, names, [load_compartment(near, backbone, n) for n in names])
        np.testing.assert_array_equal(got, want)
        assert got[0, 3:].sum() == 0 and got[1, :3].sum() == 0
        gen = generate_from_store(far, backbone, names, labels=[0, 9], weighting="naive", steps=2)
        assert gen.evals == 2 * 2  # one compartment per label: the class priors of the imported sources
