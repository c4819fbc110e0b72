"""The command line on tiny weights: sample writes a grid and an .npz; bad input is one short line."""

import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from cdm.backbone import Backbone, PixelCodec, UViT, UViTConfig
from cdm.cli.main import app

runner = CliRunner()


@pytest.fixture()
def tiny_backbone(tmp_path):
    net = UViT(UViTConfig(img_size=14, patch_size=7, embed_dim=16, depth=1, num_heads=2))
    Backbone(net, codec=PixelCodec(28, 14)).save_pretrained(tmp_path / "bb")
    return tmp_path / "bb"


def test_sample_writes_npz_and_grid(tiny_backbone, tmp_path):
    out = tmp_path / "s"
    res = runner.invoke(app, ["sample", "--backbone", str(tiny_backbone), "--out", str(out), "--per-class", "2",
                              "--classes", "3,7", "--steps", "3", "--bf16"])
    assert res.exit_code == 0, res.output
    with np.load(out / "samples.npz", allow_pickle=False) as f:
        assert f["images"].shape == (4, 28, 28) and f["images"].dtype == np.uint8
        assert f["labels"].tolist() == [3, 3, 7, 7]
    assert (out / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sample_is_reproducible(tiny_backbone, tmp_path):
    for name in ("a", "b"):
        assert runner.invoke(app, ["sample", "--backbone", str(tiny_backbone), "--out", str(tmp_path / name),
                                   "--per-class", "1", "--steps", "2", "--seed", "5"]).exit_code == 0
    with np.load(tmp_path / "a" / "samples.npz") as a, np.load(tmp_path / "b" / "samples.npz") as b:
        assert np.array_equal(a["images"], b["images"])


def _cdm(*args):
    return subprocess.run([sys.executable, "-m", "cdm", *args], capture_output=True, text=True, timeout=120)


def test_bad_input_is_one_short_line(tiny_backbone, tmp_path):
    evil = tmp_path / "weights.pt"
    evil.write_bytes(b"\x80\x04K\x01.")
    for args, needle in [
        (["sample", "--backbone", str(evil), "--out", str(tmp_path / "x")], "pickle"),
        (["sample", "--backbone", str(tmp_path / "missing"), "--out", str(tmp_path / "x")], "no such backbone"),
        (["sample", "--backbone", str(tiny_backbone), "--solver", "euler", "--steps", "2",
          "--out", str(tmp_path / "x")], "unknown solver"),
        (["sample", "--backbone", str(tiny_backbone), "--classes", "a,b", "--out", str(tmp_path / "x")], "--classes"),
    ]:
        res = _cdm(*args)
        assert res.returncode == 2, res.stderr
        assert needle in res.stderr and "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) <= 3
    assert not (tmp_path / "x").exists()
