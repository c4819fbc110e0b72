"""Colour images of other sizes through every path, on tiny 3-channel configs of two sizes: pretrain a backbone
on public colour images, add sources (fitted to the backbone's images), compose, attribute, forget (exact), and
serve them (colour PNGs)."""

import base64
import io

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cdm.backbone import Backbone
from cdm.cli.main import app
from cdm.data import ImageSpec, Source, load_npz
from cdm.operations import load_compartment
from cdm.store import Store
from cdm.training import PretrainConfig, pretrain

COLOURS = np.array([[220, 40, 40], [40, 200, 60], [40, 70, 230], [230, 200, 40]], np.uint8)


def shapes(n: int, size: int, seed: int) -> Source:
    """Coloured discs and squares on white: class = colour (4 classes), position and radius random."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    images, labels = [], []
    for i in range(n):
        k = i % len(COLOURS)
        img = np.full((size, size, 3), 255, np.uint8)
        cy, cx, r = rng.uniform(size * 0.3, size * 0.7, 2).tolist() + [rng.uniform(size * 0.15, size * 0.3)]
        inside = (yy - cy) ** 2 + (xx - cx) ** 2 < r**2 if i % 2 else (abs(yy - cy) < r) & (abs(xx - cx) < r)
        img[inside] = COLOURS[k]
        images.append(img)
        labels.append(k)
    return Source(f"shapes{size}-{seed}", np.stack(images), np.array(labels), classes=("red", "green", "blue", "gold"))


@pytest.fixture(scope="module", params=[(16, 8, 4), (12, 12, 4)], ids=["16px-pooled-to-8", "12px"])
def colour_backbone(request, tmp_path_factory):
    data_size, img_size, patch = request.param
    root = tmp_path_factory.mktemp(f"colour{data_size}")
    shapes(48, 24, seed=1).to_npz(root / "public.npz")  # public data at another size: fitted to data_size
    cfg = PretrainConfig(data=str(root / "public.npz"), data_size=data_size, channels=3, img_size=img_size,
                         patch_size=patch, embed_dim=16, depth=3, num_heads=2, steps=6, batch_size=8, warmup=1,
                         checkpoint_every=6)
    rec = pretrain(cfg, root / "bb", progress=False)
    assert rec["finished"]
    bb = Backbone.from_pretrained(root / "bb")
    assert bb.codec.spec == ImageSpec(data_size, data_size, 3) and bb.config.in_chans == 3
    assert bb.config.num_classes == 5 and bb.config.null_class == 4  # four colours and the null class
    return root, bb, data_size


def test_colour_store_through_every_path(colour_backbone, tmp_path):
    root, bb, size = colour_backbone
    run = CliRunner().invoke
    st_dir = tmp_path / "st"
    shapes(24, 20, seed=2).to_npz(tmp_path / "a.npz")  # 20 px: fitted on the way in
    shapes(24, size, seed=3).to_npz(tmp_path / "b.npz")
    common = ["--store", str(st_dir)]
    train = ["--steps", "4", "--prompts", "2", "--batch-size", "8"]
    res = run(app, ["add", str(tmp_path / "a.npz"), "--name", "a", "--backbone", str(root / "bb"), *train, *common])
    assert res.exit_code == 0, res.output
    assert f"20x20 RGB images fitted to the backbone's {size}x{size} RGB (lanczos)" in res.output
    res = run(app, ["add", str(tmp_path / "b.npz"), "--name", "b", *train, *common])
    assert res.exit_code == 0, res.output
    res = run(app, ["add", str(tmp_path / "b.npz"), "--name", "private", "--dp-epsilon", "8", "--steps", "2",
                    "--prompts", "2", "--batch-size", "8", *common])  # DP-SGD on colour images
    assert res.exit_code == 0, res.output
    with Store.open(st_dir) as st:
        assert st.compartment("private")["manifest"]["dp"]["epsilon"] <= 8

    # composed, class-conditional and unconditional: colour sample files with their spec
    res = run(app, ["sample", *common, "--sources", "a,b", "--per-class", "1", "--steps", "3", "--out",
                    str(tmp_path / "s")])
    assert res.exit_code == 0, res.output
    with np.load(tmp_path / "s" / "samples.npz") as f:
        assert f["images"].shape == (4, size, size, 3) and f["labels"].tolist() == [0, 1, 2, 3]
        assert (int(f["height"]), int(f["width"]), int(f["channels"])) == (size, size, 3)
    assert load_npz(tmp_path / "s" / "samples.npz").spec == ImageSpec(size, size, 3)
    png = Image.open(tmp_path / "s" / "samples.png")
    assert png.mode == "RGB"
    res = run(app, ["sample", *common, "--sources", "a,b", "--n", "2", "--steps", "3", "--weighting", "naive",
                    "--out", str(tmp_path / "u")])
    assert res.exit_code == 0, res.output
    assert np.load(tmp_path / "u" / "samples.npz")["images"].shape == (2, size, size, 3)

    # every weighting: the heads of the learned ones trained on the colour store (isolated heads against public
    # colour images; the default core, the digits, is refused for this backbone)
    res = run(app, ["train-router", *common, "--kind", "isolated", "--steps", "3", "--batch-size", "8"])
    assert res.exit_code != 0 and "public core data of this backbone's images" in str(res.exception)
    for kind in ("router", "classifier", "isolated"):
        res = run(app, ["train-router", *common, "--kind", kind, "--steps", "3", "--batch-size", "8",
                        "--core", str(root / "public.npz")])
        assert res.exit_code == 0, res.output
    for weighting in ("router", "classifier", "isolated", "single"):
        res = run(app, ["sample", *common, "--sources", "a,b", "--n", "2", "--steps", "2", "--weighting", weighting,
                        "--out", str(tmp_path / weighting)])
        assert res.exit_code == 0, res.output
        with np.load(tmp_path / weighting / "weights.npz") as f:
            assert f["weights"].shape == (2, 2, 2) and np.allclose(f["weights"].sum(-1), 1)

    # attribution
    res = run(app, ["attribute", *common, "--sources", "a,b", "--n", "2", "--steps", "2", "--out",
                    str(tmp_path / "att")])
    assert res.exit_code == 0, res.output
    assert np.load(tmp_path / "att" / "samples.npz")["images"].shape == (2, size, size, 3)

    # forget a sample: the exact retrain on the fitted images (bit-identical to training without it)
    from cdm.compartments import CompartmentConfig
    from cdm.io import state_dict_sha256
    from cdm.operations import source_data
    from cdm.training.compartment import train_compartment

    with Store.open(st_dir) as st:
        kept = source_data(st, "a")
        assert kept.spec == ImageSpec(size, size, 3)
        gone = kept.sample_hashes[0]
    res = run(app, ["forget", "a", "--sample", gone, *common])
    assert res.exit_code == 0, res.output
    direct, _ = train_compartment(bb, kept.without([gone]), CompartmentConfig(steps=4, n_prompts=2, batch_size=8),
                                  progress=False)
    with Store.open(st_dir) as st:
        assert state_dict_sha256(load_compartment(st, bb, "a").tensors()) == state_dict_sha256(direct.tensors())
        assert gone not in source_data(st, "a").sample_hashes and st.verify() == []


def test_colour_service(colour_backbone, tmp_path):
    from serverkit import Server

    from cdm.compartments import CompartmentConfig
    from cdm.data import fit
    from cdm.operations import add_source
    from cdm.server.keys import create_key

    root, bb, size = colour_backbone
    with Store.create(tmp_path / "st") as st:
        for j in range(2):
            add_source(st, bb, fit(shapes(16, 18, seed=10 + j), bb.codec.spec), name=f"s{j}",
                       cfg=CompartmentConfig(steps=2, batch_size=8, n_prompts=2, warmup=1), progress=False)
        token, _ = create_key(st, "k", sources=["s0", "s1"])
    srv = Server(tmp_path / "st", root / "bb")
    try:
        status, out = srv.request("POST", "/v1/generate", {"classes": [0, 3], "n": 2, "steps": 2}, token=token)
        assert status == 200, out
        img = Image.open(io.BytesIO(base64.b64decode(out["images"][0]["png"])))
        assert img.mode == "RGB" and img.size == (size, size)
        assert set(out["images"][0]["weights"]) == {"s0", "s1"}
    finally:
        srv.stop()
