"""A non-editable install (a wheel, as `pip install .` makes) finds the shipped weights: no path into a source
checkout is assumed."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def test_an_installed_wheel_samples_from_another_directory(tmp_path):
    src = tmp_path / "checkout"  # build from a copy: an in-tree build would leave build/ in the checkout
    shutil.copytree(REPO / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    wheels, site, elsewhere = tmp_path / "wheels", tmp_path / "site", tmp_path / "elsewhere"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(src)], check=True,
                   timeout=600)
    (wheel,) = wheels.glob("cdm-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True, timeout=300)
    shutil.rmtree(src)  # nothing may point back into the build tree
    elsewhere.mkdir()
    code = (f"import sys; sys.path.insert(0, {str(site)!r}); import cdm; "
            f"assert cdm.__file__.startswith({str(site)!r}), cdm.__file__; "
            "from cdm.cli.main import main; "
            "sys.argv = ['cdm', 'sample', '--per-class', '1', '--classes', '3,4', '--steps', '2', '--out', 'o']; "
            "main()")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    with np.load(elsewhere / "o" / "samples.npz") as f:
        assert f["images"].shape == (2, 28, 28) and f["labels"].tolist() == [3, 4]
    shipped = sorted(p.name for p in (site / "cdm" / "weights").iterdir())
    assert shipped == ["autoencoder-emoji", "backbone", "backbone-emoji", "backbone-emoji-latent", "backbone-glyphs",
                       "classifier", "judge-emoji", "judge-emoji-subcategory"]
    assert (site / "cdm" / "data" / "emoji" / "twemoji.npz").is_file()
    # the shipped latent backbone finds its shipped autoencoder inside the installed package
    code = (f"import sys; sys.path.insert(0, {str(site)!r}); from cdm.backbone import Backbone; "
            "bb = Backbone.from_pretrained('shipped:backbone-emoji-latent'); "
            "assert bb.latent and str(bb.codec.autoencoder.ref) == 'shipped:autoencoder-emoji'; "
            f"assert __import__('cdm').__file__.startswith({str(site)!r})")
    res = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
