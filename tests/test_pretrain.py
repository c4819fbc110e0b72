"""Backbone pretraining: public data only (proved by hashes), resumable bit-identically, NaN stops cleanly."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from cdm.backbone import Backbone
from cdm.data import Source, public_protected
from cdm.errors import TrainingError
from cdm.training import PretrainConfig, pretrain, public_training_set

TINY = dict(embed_dim=16, depth=1, num_heads=2, patch_size=7, batch_size=8, warmup=2, checkpoint_every=3)
SHIPPED = Path(__file__).resolve().parents[1] / "weights" / "backbone"


def _hashes(images: np.ndarray) -> set[str]:
    return {hashlib.sha256(np.ascontiguousarray(im).tobytes()).hexdigest() for im in images}


@pytest.mark.parametrize("n_glyphs", [0, 50])
def test_no_protected_sample_reaches_backbone_training(tmp_path, n_glyphs):
    _, protected = public_protected()
    protected_hashes = set(protected.sample_hashes)
    assert len(protected_hashes) == 4000
    seen: set[str] = set()
    cfg = PretrainConfig(steps=4, glyphs=n_glyphs, **TINY)
    record = pretrain(cfg, tmp_path, progress=False, on_batch=lambda imgs: seen.update(_hashes(imgs)))
    trained_on = set(record["data"]["sample_hashes"])
    assert seen and seen <= trained_on
    assert not trained_on & protected_hashes
    assert trained_on == set(public_training_set(cfg).sample_hashes)
    assert json.loads((tmp_path / "training.json").read_text())["data"]["sample_hashes"] == sorted(trained_on)


def test_glyph_only_backbone_sees_no_handwritten_digit(tmp_path):
    public, protected = public_protected()
    mnist = set(public.sample_hashes) | set(protected.sample_hashes)
    seen: set[str] = set()
    cfg = PretrainConfig(steps=4, glyphs=40, public_digits=False, **TINY)
    record = pretrain(cfg, tmp_path, progress=False, on_batch=lambda imgs: seen.update(_hashes(imgs)))
    assert seen and not seen & mnist
    assert record["data"]["n"] == 40 and not set(record["data"]["sample_hashes"]) & mnist
    with pytest.raises(ValueError, match="needs data"):
        public_training_set(PretrainConfig(glyphs=0, public_digits=False))


@pytest.mark.parametrize("name", ["backbone", "backbone-glyphs"])
def test_shipped_backbones_were_trained_on_public_data_only(name):
    if not (SHIPPED.parent / name / "training.json").exists():
        pytest.skip(f"no shipped {name} in this checkout")
    record = json.loads((SHIPPED.parent / name / "training.json").read_text())
    _, protected = public_protected()
    cfg = PretrainConfig.from_dict(record["config"])
    assert not set(record["data"]["sample_hashes"]) & set(protected.sample_hashes)
    data = public_training_set(cfg)
    # records written before captions were part of a source's content (issue 19) hash images and labels only;
    # pretraining reads no captions, so both name the same training data
    assert record["data"]["content_hash"] in {data.content_hash,
                                              Source(data.id, data.images, data.labels, data.classes).content_hash}
    assert record["finished"] and record["steps_done"] == cfg.steps


def test_resumed_training_is_bit_identical(tmp_path):
    cfg = PretrainConfig(steps=6, **TINY)
    full = pretrain(cfg, tmp_path / "a", progress=False)
    part = pretrain(cfg, tmp_path / "b", progress=False, max_minutes=0.0)  # stops at the first checkpoint
    assert not part["finished"] and part["steps_done"] == 3
    assert not (tmp_path / "b" / "model.safetensors").exists()
    done = pretrain(cfg, tmp_path / "b", progress=False)
    assert done["finished"] and done["final_loss"] == full["final_loss"]
    assert Backbone.from_pretrained(tmp_path / "a").hash == Backbone.from_pretrained(tmp_path / "b").hash


def test_resume_with_another_config_is_refused(tmp_path):
    pretrain(PretrainConfig(steps=3, **TINY), tmp_path, progress=False)
    with pytest.raises(TrainingError, match="another config"):
        pretrain(PretrainConfig(steps=3, **{**TINY, "lr": 1e-4}), tmp_path, progress=False)


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    import importlib

    mod = importlib.import_module("cdm.training.pretrain")

    real, calls = mod.eps_loss, []

    def poisoned(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) == 5 else loss

    monkeypatch.setattr(mod, "eps_loss", poisoned)
    cfg = PretrainConfig(steps=9, **TINY)
    with pytest.raises(TrainingError, match=r"loss is nan at step 4.*step 3"):
        pretrain(cfg, tmp_path, progress=False)
    before = (tmp_path / "checkpoint.safetensors").read_bytes()
    monkeypatch.setattr(mod, "eps_loss", real)
    calls.clear()
    resumed = pretrain(cfg, tmp_path, progress=False)  # resumes from the good checkpoint at step 3
    assert resumed["finished"] and before != (tmp_path / "checkpoint.safetensors").read_bytes()
    assert Backbone.from_pretrained(tmp_path).hash == Backbone.from_pretrained(
        (pretrain(cfg, tmp_path / "clean", progress=False), tmp_path / "clean")[1]).hash


def test_git_commit_takes_cdm_commit_for_tree_copies(monkeypatch):
    from cdm.provenance import git_commit

    monkeypatch.delenv("CDM_COMMIT", raising=False)
    own = git_commit()
    assert own != "abc123"
    monkeypatch.setenv("CDM_COMMIT", "abc123")
    assert git_commit() == "abc123"
