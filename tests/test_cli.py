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
          "--out", str(tmp_path / "x")], "'euler' is not one of 'ddim'"),
        (["sample", "--backbone", str(tiny_backbone), "--weighting", "bogus", "--out", str(tmp_path / "x")],
         "'bogus' is not one of 'ito'"),
        (["bench", "--profile", "huge", "--out", str(tmp_path / "x")], "'huge' is not one of 'toy'"),
        (["sample", "--backbone", str(tiny_backbone), "--classes", "a,b", "--out", str(tmp_path / "x")], "--classes"),
    ]:
        res = _cdm(*args)
        assert res.returncode == 2, res.stderr
        assert needle in res.stderr and "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) <= 3
    assert not (tmp_path / "x").exists()


def test_every_option_has_help_and_choices_are_listed():
    """Every option of every command says what it is for; a choice lists its values in --help."""
    import typer.main

    group = typer.main.get_command(app)

    def commands(g, prefix=""):
        for name, cmd in g.commands.items():
            if hasattr(cmd, "commands"):
                yield from commands(cmd, prefix + name + " ")
            else:
                yield prefix + name, cmd

    missing = [f"{name} --{p.name}" for name, cmd in commands(group) for p in cmd.params
               if getattr(p, "param_type_name", "") == "option" and not (p.help or "").strip()]
    assert missing == []
    res = runner.invoke(app, ["sample", "--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0 and "ddpm" in res.output and "isolated" in res.output


def test_store_commands_need_a_store_and_the_shipped_classifier_is_never_the_default_out(tmp_path):
    for args in (["serve"], ["keys", "list"], ["keys", "create", "k"], ["keys", "revoke", "k"], ["sources"],
                 ["train-classifier"]):
        res = _cdm(*args)
        assert res.returncode == 2 and "Missing option" in res.stderr, (args, res.stderr)
        assert len(res.stderr.strip().splitlines()) <= 3
    res = _cdm("train-classifier", "--out", "shipped-copy-is-refused/../" * 0 + str(_shipped("classifier")))
    assert res.returncode == 2 and "inside the shipped weights" in res.stderr


def _shipped(name):
    from cdm.shipped import shipped

    return shipped(name)
