"""Latent mode end to end on tiny weights: the autoencoder contract, latent backbones (hash, refusal of another
autoencoder), latents cached in the store and forgotten with their samples, exact sample forgetting, every
weighting, heads, attribution, DP, pretraining, the service."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cdm.autoencoder import Autoencoder, small_autoencoder
from cdm.backbone import Backbone, LatentCodec, UViT, UViTConfig
from cdm.cli.main import app
from cdm.compartments import CompartmentConfig
from cdm.data import public_protected, split_stratified
from cdm.errors import CdmError, WeightsError
from cdm.io import state_dict_sha256
from cdm.operations import (add_source, add_source_dp, attribute_samples, forget_samples, forget_source,
                            generate_from_store, load_compartment, model_inputs, runnable_weightings, source_data,
                            train_paragon, train_router_op)
from cdm.privacy import DPConfig
from cdm.store import Store
from cdm.training import PretrainConfig, pretrain
from cdm.training.compartment import train_compartment

CFG = CompartmentConfig(steps=4, batch_size=8, n_prompts=2, checkpoint_every=2, warmup=1, validation=0.0)


def _ae(path, seed: int = 0, scale: float = 1.0) -> Autoencoder:
    torch.manual_seed(seed)
    net = small_autoencoder(widths=(4, 8), groups=2)  # factor 2, 4 latent channels
    net.register_to_config(scaling_factor=scale, shift_factor=0.1)
    Autoencoder(net).save_pretrained(path)
    return Autoencoder.from_pretrained(path)


@pytest.fixture(scope="module")
def latent(tmp_path_factory):
    """A tiny latent backbone for 28x28 grey digits: an RGB autoencoder (f2) -> 4x14x14 latents -> a U-ViT."""
    root = tmp_path_factory.mktemp("latent")
    ae = _ae(root / "ae", scale=0.7)
    torch.manual_seed(0)
    net = UViT(UViTConfig(img_size=14, patch_size=7, in_chans=4, embed_dim=16, depth=1, num_heads=2))
    Backbone(net, codec=LatentCodec(ae, data_size=28, channels=1)).save_pretrained(root / "bb")
    return root


@pytest.fixture(scope="module")
def parts():
    _, protected = public_protected()
    return split_stratified(protected.subset(np.arange(0, 4000, 50), id="mnist/protected/every50"), 2)


def test_the_autoencoder_contract(tmp_path):
    from diffusers import AutoencoderKL

    ae = _ae(tmp_path / "ae", scale=2.0)
    again = Autoencoder.from_pretrained(tmp_path / "ae")
    assert again.hash == ae.hash and (ae.factor, ae.latent_channels, ae.channels) == (2, 4, 3)
    assert AutoencoderKL.from_pretrained(tmp_path / "ae").config.scaling_factor == 2.0  # diffusers reads it too
    x = torch.rand(5, 3, 8, 8) * 2 - 1
    z = ae.encode(x)
    assert z.shape == (5, 4, 4, 4)
    assert torch.equal(z[3:4], ae.encode(x[3:4]))  # a latent never depends on its batch
    raw = ae.net.encode(x).latent_dist.mode()
    torch.testing.assert_close(z, (raw - 0.1) * 2.0)  # shift then scale
    assert ae.decode(z).shape == (5, 3, 8, 8)
    other = _ae(tmp_path / "other", seed=1, scale=2.0)
    assert other.hash != ae.hash and _ae(tmp_path / "rescaled", scale=3.0).hash != ae.hash
    with pytest.raises(ValueError, match="multiples of 2"):
        ae.encode(torch.zeros(1, 3, 7, 7))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(WeightsError, match="AutoencoderKL"):
        Autoencoder.from_pretrained(tmp_path / "bad")


def test_the_autoencoder_trains_on_public_data_only(tmp_path):
    from cdm.autoencoder.train import AutoencoderTrainConfig, public_autoencoder_set, train_autoencoder
    from cdm.data.emoji import ARTISTS, emoji
    from cdm.shipped import WEIGHTS_DIR

    cfg = AutoencoderTrainConfig(widths=(4, 8), steps=2, batch_size=4, glyphs=20)
    images, data = public_autoencoder_set(cfg)
    seen = {img.tobytes() for img in images}
    for artist in ARTISTS:
        if artist != "noto":
            assert not seen & {img.tobytes() for img in emoji(artist).images}, artist
    assert {img.tobytes() for img in emoji("noto").images} <= seen and data["n"] == len(images)
    ae, record = train_autoencoder(cfg, tmp_path / "ae", progress=False, evaluate=False)
    assert ae.factor == 2 and (tmp_path / "ae" / "training.json").exists() and record["steps_done"] == 2
    z = ae.encode(torch.from_numpy(images).float().permute(0, 3, 1, 2) / 127.5 - 1)
    assert abs(float(z.mean())) < 1e-3 and abs(float(z.std()) - 1) < 1e-3  # shift and scale normalise them
    runner = CliRunner()
    res = runner.invoke(app, ["train-autoencoder", "--out", str(WEIGHTS_DIR / "x"), "--steps", "1"])
    assert res.exit_code != 0 and "inside the shipped weights" in str(res.exception)
    res = runner.invoke(app, ["train-autoencoder", "--out", str(tmp_path / "ae"), "--steps", "1"])
    assert res.exit_code != 0 and "not an empty directory" in str(res.exception)


def test_a_latent_backbone_is_bound_to_its_autoencoder(latent, tmp_path):
    bb = Backbone.from_pretrained(latent / "bb")
    assert bb.latent and bb.codec.model_size == 14 and bb.codec.model_channels == 4 and bb.codec.x0_range is None
    cfg = json.loads((latent / "bb" / "config.json").read_text())["codec"]
    assert cfg["kind"] == "latent" and cfg["autoencoder_hash"] == bb.codec.autoencoder.hash
    assert bb.hash != state_dict_sha256(bb.net.state_dict())  # the hash covers the autoencoder
    other = _ae(tmp_path / "other", seed=3)
    with pytest.raises(WeightsError, match="is not the one this backbone was trained with"):
        Backbone.from_pretrained(latent / "bb", autoencoder=tmp_path / "other")
    swapped = Backbone(bb.net, codec=LatentCodec(other, data_size=28, channels=1))
    assert swapped.hash != bb.hash
    images = public_protected()[0].images[:3]
    z = bb.codec.encode(images)
    assert z.shape == (3, 4, 14, 14) and bb.codec.decode(z).shape == images.shape


def test_latents_are_cached_in_the_store_and_forgotten_with_their_samples(latent, parts, tmp_path):
    bb = Backbone.from_pretrained(latent / "bb")
    with Store.create(tmp_path / "st") as st:
        add_source(st, bb, parts[0], name="s0", cfg=CFG, progress=False)
        add_source(st, bb, parts[1], name="s1", cfg=CFG, progress=False)
        folder = st.samples_file("s0").parent
        cached = sorted(folder.glob("latents-*"))
        assert len(cached) == 1 and parts[0].content_hash[:32] in cached[0].name
        assert bb.codec.hash[:32] in cached[0].name
        z = model_inputs(st, bb, "s0")
        assert torch.equal(z, bb.codec.encode(parts[0].images))  # cached == fresh, bit for bit, in source order
        assert st.verify() == []
        # a pixel backbone (or another autoencoder's) is refused by the store
        with pytest.raises(CdmError, match="was created with backbone"):
            add_source(st, Backbone(bb.net, codec=LatentCodec(_ae(tmp_path / "o", seed=5), data_size=28,
                                                                 channels=1)), parts[1], name="s2", cfg=CFG)
        # forgetting samples: the old latents go, the retrain is bit-identical to training on the reduced source
        gone = [parts[0].sample_hashes[2], parts[0].sample_hashes[9]]
        old_bytes = cached[0].read_bytes()
        out = forget_samples(st, bb, "s0", gone, reason="owner request", progress=False)
        direct, _ = train_compartment(bb, parts[0].without(gone), CFG, progress=False)
        assert state_dict_sha256(load_compartment(st, bb, "s0").tensors()) == state_dict_sha256(direct.tensors())
        assert out.n_removed == 2 and not cached[0].exists()
        now = sorted(folder.glob("latents-*"))
        assert len(now) == 1 and source_data(st, "s0").content_hash[:32] in now[0].name
        # every weighting runs in latent space (learned ones once their heads are trained)
        train_router_op(st, bb, ["s0", "s1"], steps=2, batch_size=8, progress=False)
        train_router_op(st, bb, ["s0", "s1"], kind="classifier", steps=2, batch_size=8, progress=False)
        train_paragon(st, bb, cfg=CFG, progress=False)
        weightings = runnable_weightings(st, ["s0", "s1"])
        assert {"ito", "naive", "router", "classifier"} <= set(weightings)
        for w in weightings:
            gen = generate_from_store(st, bb, ["s0", "s1"], labels=np.array([1, 7]), weighting=w, steps=2)
            assert gen.images.shape == (2, 28, 28) and gen.images.dtype == np.uint8, w
        att = attribute_samples(st, bb, ["s0", "s1"], n=2, steps=2, probes=1)
        assert att.images.shape == (2, 28, 28) and att.credit.shape == (2, 2)
        # DP-SGD on cached latents
        add_source_dp(st, bb, parts[1].subset(np.arange(20), id="p"), name="private", cfg=CFG,
                      dp=DPConfig(epsilon=50.0), progress=False)
        assert (st.samples_file("private").parent / sorted(p.name for p in (
            st.samples_file("private").parent).glob("latents-*"))[0]).exists()
        # forgetting the source: its latents leave with its samples, no byte of them left in the store
        probe = now[0].read_bytes()[-64:]
        forget_source(st, "s0", reason="withdrawn")
        assert not folder.exists() and st.verify() == []
        for f in st.path.rglob("*"):
            if f.is_file():
                data = f.read_bytes()
                assert probe not in data and old_bytes[-64:] not in data, f


def test_pretrain_in_latent_mode(latent, tmp_path):
    cfg = PretrainConfig(autoencoder=str(latent / "ae"), data_size=28, img_size=14, patch_size=7, embed_dim=16,
                         depth=1, num_heads=2, steps=2, batch_size=8, warmup=1, checkpoint_every=2)
    assert pretrain(cfg, tmp_path / "bb", progress=False)["finished"]
    bb = Backbone.from_pretrained(tmp_path / "bb")
    assert bb.latent and bb.config.in_chans == 4 and bb.codec.spec.channels == 1
    res = CliRunner().invoke(app, ["pretrain", "--out", str(tmp_path / "no"), "--autoencoder", str(latent / "ae"),
                                   "--image-size", "7", "--patch-size", "7", "--steps", "1"])
    assert res.exit_code != 0 and "set the image size to 14" in str(res.exception)
    assert not (tmp_path / "no").exists()


def test_bench_and_demo_take_latent(tmp_path):
    res = CliRunner().invoke(app, ["bench", "--latent", "--out", str(tmp_path / "b"), "--profile", "toy"])
    assert res.exit_code != 0 and "no latent backbone ships for digits" in str(res.exception)
    res = CliRunner().invoke(app, ["demo", "--dataset", "emoji", "--latent", "--backbone", "x", "--out",
                                   str(tmp_path / "d")])
    assert res.exit_code != 0 and "leave out --backbone" in str(res.exception)
    assert not (tmp_path / "b").exists() and not (tmp_path / "d").exists()


def test_the_service_serves_a_latent_store(latent, tmp_path):
    from serverkit import Server, build_store

    store, bb_dir, tokens = build_store(tmp_path, {"admin": None, "a": ["alpha"]}, backbone=latent / "bb")
    srv = Server(store, bb_dir, "--max-steps", "10")
    try:
        status, out = srv.request("POST", "/v1/generate", {"sources": ["alpha"], "n": 2, "steps": 2},
                                  token=tokens["a"])
        assert status == 200, out
        assert len(out["images"]) == 2 and out["sources"] == ["alpha"]
        status, out = srv.request("POST", "/v1/generate", {"sources": ["alpha", "beta"], "n": 1, "steps": 2},
                                  token=tokens["admin"])
        assert status == 200 and set(out["images"][0]["weights"]) == {"alpha", "beta"}, out
    finally:
        srv.stop()
