"""Image grids as PNG (grey or RGB, like the data), and sample sets as ``.npz`` with their grid."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from .io import atomic_write_bytes

__all__ = ["grid", "save_grid", "write_samples"]


def grid(images: np.ndarray, nrow: int | None = None, pad: int = 2, scale: int = 2) -> np.ndarray:
    """Tile uint8 images, (N, H, W) grey or (N, H, W, 3) RGB, into one uint8 image, ``nrow`` images per row."""
    images = np.asarray(images)
    n, h, w = images.shape[:3]
    extra = images.shape[3:]  # () grey, (3,) RGB
    nrow = nrow or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / nrow))
    out = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, *extra), 64, dtype=np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, nrow)
        out[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = img
    if scale > 1:
        out = out.repeat(scale, axis=0).repeat(scale, axis=1)
    return out


def save_grid(images: np.ndarray, path: str | Path, nrow: int | None = None, scale: int = 2) -> None:
    buf = io.BytesIO()
    Image.fromarray(grid(images, nrow=nrow, scale=scale)).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def write_samples(out: Path, name: str, images: np.ndarray, labels: np.ndarray | None, nrow: int) -> None:
    """``name.npz`` (images uint8 N x H x W or N x H x W x 3, labels, and the image spec as ``height``,
    ``width``, ``channels``) and ``name.png`` (a grid), atomically."""
    out.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    images = np.asarray(images)
    spec = {"height": np.int64(images.shape[1]), "width": np.int64(images.shape[2]),
            "channels": np.int64(images.shape[3] if images.ndim == 4 else 1)}
    np.savez_compressed(buf, images=images, **spec, **({} if labels is None else {"labels": labels}))
    atomic_write_bytes(out / f"{name}.npz", buf.getvalue())
    save_grid(images, out / f"{name}.png", nrow=nrow)
