"""Synthetic public "core" set: font glyphs distorted to look roughly handwritten, MNIST style.

Each sample is a digit or uppercase letter drawn in a font that matplotlib ships, thickened by a random
stroke, warped by a random affine map plus a smooth elastic displacement field, then fitted into a 20x20 box
and placed in a 28x28 frame by its centre of mass (the MNIST recipe), white ink on black.

The set is unlimited and seeded: sample ``i`` depends only on ``(seed, i, charset)``, so
``glyphs(100, seed=0)`` is the first 100 samples of ``glyphs(1000, seed=0)``, and sample ``i`` has class
``i % n_classes``, so every prefix is balanced to within one sample per class. Pixels are reproducible on
one machine; another FreeType build may differ in the last anti-aliasing level.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..errors import DataError
from .captions import glyph_caption
from .source import Source

__all__ = ["CHARSETS", "FONT_NAMES", "Charset", "available_fonts", "glyph_id", "glyphs"]

Charset = Literal["digits", "letters", "all"]

_DIGITS = tuple("0123456789")
_LETTERS = tuple("ABCDEFGHIJKLMNOPQRSTUVWXYZ")
CHARSETS: dict[str, tuple[str, ...]] = {"digits": _DIGITS, "letters": _LETTERS, "all": _DIGITS + _LETTERS}
_CHARSET_KEY = {"digits": 0, "letters": 1, "all": 2}  # mixed into the seed so charsets draw independently

FONT_NAMES: tuple[str, ...] = (
    "DejaVuSans",
    "DejaVuSans-Bold",
    "DejaVuSans-Oblique",
    "DejaVuSerif",
    "DejaVuSerif-Bold",
    "DejaVuSerif-Italic",
    "DejaVuSansMono",
    "STIXGeneral",
    "STIXGeneralBol",
    "STIXGeneralItalic",
    "cmr10",
    "cmss10",
    "cmtt10",
)

# Rendering geometry (pixels at render resolution unless noted).
_CANVAS = 96  # square render canvas
_FONT_SIZE = 52  # em size: a digit is ~38 px tall, so the 20 px box is a ~2x reduction
_MAX_STROKE = 2  # PIL stroke_width drawn from 0.._MAX_STROKE ...
_MAX_STROKE_BOLD = 1  # ... or from 0.._MAX_STROKE_BOLD for bold fonts, which are thick already
_BOLD = frozenset({"DejaVuSans-Bold", "DejaVuSerif-Bold", "STIXGeneralBol"})
_ROTATE_DEG = 12.0
_SCALE = (0.8, 1.1)  # drawn separately for x and y (a uniform scale is undone by the 20 px fit)
_SHEAR = 0.2
_COARSE = 13  # the elastic field is white noise on a 13x13 grid (8 px apart), Gaussian-filtered, interpolated
_ELASTIC_PX = 3.0  # upper bound of the field's RMS displacement
_BOX = 20  # MNIST: the digit is fitted into a 20x20 box ...
_FRAME = 28  # ... inside a 28x28 frame, centred by centre of mass at (14, 14)
_CENTRE = 14.0
_LEVELS = (0.05, 0.85)  # after the fit, ink below 5% of the peak becomes 0 and above 85% becomes 255
_TRANSLATE_PX = 2.0  # at 28x28: offset of the centre of mass from (14, 14), drawn in +-_TRANSLATE_PX


def _font_dir() -> Path:
    import matplotlib  # deferred, like scipy below: importing cdm.data stays fast

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


@functools.cache
def _font(name: str) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(_font_dir() / f"{name}.ttf"), _FONT_SIZE)


def _render(name: str, char: str, stroke: int = 0) -> np.ndarray:
    """``char`` in font ``name`` as float32 (canvas x canvas) in 0..255, its ink box centred on the canvas."""
    font = _font(name)
    left, top, right, bottom = font.getbbox(char, stroke_width=stroke)
    img = Image.new("L", (_CANVAS, _CANVAS), 0)
    x = (_CANVAS - (right - left)) / 2 - left
    y = (_CANVAS - (bottom - top)) / 2 - top
    ImageDraw.Draw(img).text((x, y), char, font=font, fill=255, stroke_width=stroke, stroke_fill=255)
    return np.asarray(img, dtype=np.float32)


@functools.cache
def _usable(name: str) -> bool:
    """Whether font ``name`` exists and draws every digit and letter as a real, distinct glyph (not a box)."""
    from matplotlib.ft2font import FT2Font

    path = _font_dir() / f"{name}.ttf"
    if not path.is_file():
        return False
    try:
        ft = FT2Font(str(path))
        _font(name)
    except (OSError, RuntimeError, ValueError):
        return False
    if any(ft.get_char_index(ord(c)) == 0 for c in CHARSETS["all"]):
        return False
    notdef = _render(name, "\ue000") if ft.get_char_index(0xE000) == 0 else None
    for c in CHARSETS["all"]:
        img = _render(name, c)
        if img.max() == 0 or (notdef is not None and np.array_equal(img, notdef)):
            return False
    return True


@functools.cache
def available_fonts() -> tuple[str, ...]:
    """The fonts of :data:`FONT_NAMES` that this installation has and that draw all 36 glyphs."""
    fonts = tuple(name for name in FONT_NAMES if _usable(name))
    if not fonts:
        raise DataError(f"{_font_dir()}: none of the glyph fonts ({', '.join(FONT_NAMES)}) is usable")
    return fonts


@functools.cache
def _base(font: int, char: str, stroke: int) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """The centred glyph (read-only) and its ink box ``(top, bottom, left, right)``, bottom/right exclusive."""
    img = _render(available_fonts()[font], char, stroke)
    img.flags.writeable = False
    rows = np.flatnonzero(img.max(axis=1) > 0)
    cols = np.flatnonzero(img.max(axis=0) > 0)
    return img, (int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1)


@functools.cache
def _upsampler() -> np.ndarray:
    """Linear interpolation matrix (canvas x coarse) from the coarse elastic grid to canvas pixels."""
    pos = np.linspace(0, _COARSE - 1, _CANVAS)
    lo = np.minimum(np.floor(pos).astype(int), _COARSE - 2)
    frac = pos - lo
    up = np.zeros((_CANVAS, _COARSE), dtype=np.float32)
    up[np.arange(_CANVAS), lo] = 1 - frac
    up[np.arange(_CANVAS), lo + 1] = frac
    return up


def _warp(font: int, char: str, stroke: int, rng: np.random.Generator) -> np.ndarray:
    """Random affine (rotation, anisotropic scale, shear) plus a smooth elastic field, about the centre.

    Only the window of the canvas that can hold ink is computed.
    """
    from scipy import ndimage

    img, (top, bottom, left, right) = _base(font, char, stroke)
    theta = np.deg2rad(rng.uniform(-_ROTATE_DEG, _ROTATE_DEG))
    sy, sx = rng.uniform(*_SCALE, size=2)
    shear = rng.uniform(-_SHEAR, _SHEAR)
    cos, sin = np.cos(theta), np.sin(theta)
    # Forward map in (row, col) coordinates about the centre: rotation @ shear @ scale.
    fwd = np.array([[cos, -sin], [sin, cos]]) @ np.array([[1.0, 0.0], [shear, 1.0]]) @ np.diag([sy, sx])
    # Smooth displacement field: Gaussian-filtered white noise on a coarse grid, interpolated to pixels.
    coarse = ndimage.gaussian_filter(rng.standard_normal((2, _COARSE, _COARSE)), sigma=(0, 1, 1), mode="wrap")
    coarse *= rng.uniform(0.0, _ELASTIC_PX) / max(float(coarse.std()), 1e-6)
    reach = float(np.abs(coarse).max()) + 2.0  # interpolation never exceeds the coarse extremes
    # Window of the output that the affine image of the ink box (plus the displacement reach) can touch.
    c = (_CANVAS - 1) / 2
    corners = np.array([[top, left], [top, right], [bottom, left], [bottom, right]], dtype=np.float64) - c
    moved = corners @ fwd.T + c
    r0, c0 = np.maximum(np.floor(moved.min(axis=0) - reach), 0).astype(int)
    r1, c1 = np.minimum(np.ceil(moved.max(axis=0) + reach) + 1, _CANVAS).astype(int)
    up = _upsampler()
    inv = np.linalg.inv(fwd).astype(np.float32)
    rows = (np.arange(r0, r1, dtype=np.float32) - np.float32(c))[:, None]
    cols = (np.arange(c0, c1, dtype=np.float32) - np.float32(c))[None, :]
    coords = up[None, r0:r1] @ coarse.astype(np.float32) @ up[c0:c1].T[None]
    coords[0] += inv[0, 0] * rows + inv[0, 1] * cols + np.float32(c)
    coords[1] += inv[1, 0] * rows + inv[1, 1] * cols + np.float32(c)
    return ndimage.map_coordinates(img, coords, order=1, mode="constant", cval=0.0, prefilter=False)


def _fit(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Fit the ink into a 20x20 box (aspect kept) and place it in 28x28 by its centre of mass."""
    rows = np.flatnonzero(img.max(axis=1) >= 1.0)
    cols = np.flatnonzero(img.max(axis=0) >= 1.0)
    crop = img[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    h, w = crop.shape
    scale = _BOX / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = np.asarray(Image.fromarray(crop).resize(size, Image.Resampling.LANCZOS), dtype=np.float32)
    # Contrast like MNIST: drop the faint resampling tail, saturate the stroke cores.
    lo, hi = _LEVELS
    small = np.clip((small / float(small.max()) - lo) / (hi - lo), 0.0, 1.0) * 255.0
    total = float(small.sum())
    com_r = float((small.sum(axis=1) * np.arange(small.shape[0])).sum()) / total
    com_c = float((small.sum(axis=0) * np.arange(small.shape[1])).sum()) / total
    tr, tc = rng.uniform(-_TRANSLATE_PX, _TRANSLATE_PX, size=2)
    top = min(max(round(_CENTRE + tr - com_r), 0), _FRAME - small.shape[0])
    left = min(max(round(_CENTRE + tc - com_c), 0), _FRAME - small.shape[1])
    out = np.zeros((_FRAME, _FRAME), dtype=np.float32)
    out[top : top + small.shape[0], left : left + small.shape[1]] = small
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _sample(i: int, seed: int, charset: str) -> tuple[np.ndarray, str]:
    """Glyph ``i`` and its caption (from its font, stroke and character)."""
    chars = CHARSETS[charset]
    rng = np.random.default_rng([seed, i, _CHARSET_KEY[charset]])
    fonts = available_fonts()
    font = int(rng.integers(len(fonts)))
    stroke = int(rng.integers((_MAX_STROKE_BOLD if fonts[font] in _BOLD else _MAX_STROKE) + 1))
    char = chars[i % len(chars)]
    return _fit(_warp(font, char, stroke, rng), rng), glyph_caption(fonts[font], stroke, char)


def glyph_id(n: int, seed: int, charset: str) -> str:
    """The :class:`Source` id of ``glyphs(n, seed=seed, charset=charset)``, e.g. ``glyphs/digits-s0-n1000``."""
    return f"glyphs/{charset}-s{seed}-n{n}"


def glyphs(n: int, *, seed: int = 0, charset: Charset = "digits") -> Source:
    """``n`` synthetic glyphs: sample ``i`` has class ``i % n_classes`` and depends only on ``(seed, i, charset)``.

    ``charset`` "digits" has classes "0".."9" (labels 0..9), "letters" "A".."Z" (0..25), "all" both (0..35).
    """
    if charset not in CHARSETS:
        raise DataError(f"glyphs: unknown charset {charset!r} (expected one of {', '.join(CHARSETS)})")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise DataError(f"glyphs: n must be a positive integer, got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DataError(f"glyphs: seed must be a non-negative integer, got {seed!r}")
    n, seed = int(n), int(seed)
    chars = CHARSETS[charset]
    images = np.empty((n, _FRAME, _FRAME), dtype=np.uint8)
    captions = []
    for i in range(n):
        images[i], caption = _sample(i, seed, charset)
        captions.append(caption)
    labels = np.arange(n, dtype=np.int64) % len(chars)
    return Source(id=glyph_id(n, seed, charset), images=images, labels=labels, classes=chars,
                  captions=tuple(captions))
