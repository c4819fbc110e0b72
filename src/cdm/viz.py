"""Image grids as PNG (white ink on black, like the data), and sample sets as ``.npz`` with their grid."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from .io import atomic_write_bytes

__all__ = ["grid", "save_grid", "write_samples"]


def grid(images: np.ndarray, nrow: int | None = None, pad: int = 2, scale: int = 2) -> np.ndarray:
    """Tile uint8 (N, H, W) images into one uint8 image, ``nrow`` images per row."""
    images = np.asarray(images)
    n, h, w = images.shape
    nrow = nrow or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / nrow))
    out = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad), 64, dtype=np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, nrow)
        out[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = img
    return np.kron(out, np.ones((scale, scale), dtype=np.uint8)) if scale > 1 else out


def save_grid(images: np.ndarray, path: str | Path, nrow: int | None = None, scale: int = 2) -> None:
    buf = io.BytesIO()
    Image.fromarray(grid(images, nrow=nrow, scale=scale)).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def write_samples(out: Path, name: str, images: np.ndarray, labels: np.ndarray | None, nrow: int) -> None:
    """``name.npz`` (images uint8 N x 28 x 28, labels) and ``name.png`` (a grid), atomically."""
    out.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    np.savez_compressed(buf, images=images, **({} if labels is None else {"labels": labels}))
    atomic_write_bytes(out / f"{name}.npz", buf.getvalue())
    save_grid(images, out / f"{name}.png", nrow=nrow)
