"""The weights that ship inside the package (``cdm/weights/<name>/``: config.json + model.safetensors +
training.json), found the same way in an editable checkout, an installed wheel or a ``pip install .``.

A backbone is referred to by a *ref*: ``shipped:<name>`` for a shipped bundle (so a store made on one machine
finds it on another, wherever the package is installed), else the absolute path of its directory.
"""

from __future__ import annotations

from pathlib import Path

from .errors import WeightsError

__all__ = ["PREFIX", "WEIGHTS_DIR", "names", "path_of", "ref_of", "shipped"]

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
PREFIX = "shipped:"


def names() -> list[str]:
    """The shipped bundles (``autoencoder-emoji``, ``backbone``, ``backbone-emoji``, ``backbone-emoji-latent``,
    ``backbone-glyphs``, ``classifier``, ``judge-emoji``, ``judge-emoji-subcategory``)."""
    return sorted(p.name for p in WEIGHTS_DIR.iterdir() if (p / "config.json").is_file()) if WEIGHTS_DIR.is_dir() \
        else []


def shipped(name: str) -> Path:
    """The directory of shipped bundle ``name``."""
    path = WEIGHTS_DIR / name
    if name not in names():
        raise WeightsError(f"no shipped weights named {name!r}; shipped: {', '.join(names()) or 'none'} "
                           f"(in {WEIGHTS_DIR})")
    return path


def ref_of(path: str | Path) -> str:
    """``shipped:<name>`` for a shipped bundle, else the absolute path."""
    path = Path(path).resolve()
    if path.parent == WEIGHTS_DIR.resolve():
        return PREFIX + path.name
    return str(path)


def path_of(ref: str | Path) -> Path:
    """The directory a ref (or a plain path, or ``shipped:<name>``) names."""
    ref = str(ref)
    return shipped(ref[len(PREFIX):]) if ref.startswith(PREFIX) else Path(ref)
