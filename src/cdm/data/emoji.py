"""Shipped emoji: the same subjects drawn by five artists, 32x32 RGB on white, labelled by Unicode category.

The arrays live in ``cdm/data/emoji/<artist>.npz`` (built by ``scripts/build_emoji.py``; their licences and
attribution are in ``cdm/data/emoji/README.md`` and ``licenses/``). Index ``i`` is the same subject for every
artist. Specs: ``emoji:ARTIST`` (all subjects) and ``emoji:ARTIST:CATEGORY`` (one category by slug, e.g.
``emoji:twemoji:animals-nature``; the 10 classes are kept), then the usual split suffixes
(``emoji:twemoji/classes[0-4|5-9]-1``, ``emoji:noto/strat8-3``).
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import numpy as np

from ..errors import DataError
from .captions import emoji_caption
from .source import Source

__all__ = [
    "ARTISTS",
    "EMOJI_CATEGORIES",
    "EMOJI_DIR",
    "EMOJI_SIZE",
    "category_slug",
    "emoji",
    "emoji_license",
    "emoji_metadata",
    "emoji_from_spec",
    "license_of",
]

EMOJI_DIR = Path(__file__).resolve().parent / "emoji"
EMOJI_SIZE = 32

# artist -> (name, SPDX licence of the images, upstream url)
ARTISTS: dict[str, tuple[str, str, str]] = {
    "noto": ("Google Noto Emoji", "Apache-2.0", "https://github.com/googlefonts/noto-emoji"),
    "twemoji": ("Twemoji", "CC-BY-4.0", "https://github.com/jdecked/twemoji"),
    "openmoji": ("OpenMoji", "CC-BY-SA-4.0", "https://openmoji.org"),
    "fluent": ("Microsoft Fluent Emoji (flat)", "MIT", "https://github.com/microsoft/fluentui-emoji"),
    "emojione": ("EmojiOne 2 (gemojione)", "CC-BY-SA-4.0", "https://github.com/jonathanwiesel/gemojione"),
}
LICENSE_FILES = {
    "Apache-2.0": "Apache-2.0.txt",
    "CC-BY-4.0": "CC-BY-4.0.txt",
    "CC-BY-SA-4.0": "CC-BY-SA-4.0.txt",
    "MIT": "MIT-fluentui-emoji.txt",
}
EMOJI_CATEGORIES = (
    "Smileys & Emotion",
    "People & Body",
    "Component",
    "Animals & Nature",
    "Food & Drink",
    "Travel & Places",
    "Activities",
    "Objects",
    "Symbols",
    "Flags",
)
_KEYS = {"images", "labels", "classes", "names", "subcategories", "codepoints"}
_META = ("names", "subcategories", "codepoints")
_SPEC = re.compile(r"emoji:(?P<artist>[a-z0-9_-]+)(?::(?P<category>[a-z0-9-]+))?")


def category_slug(category: str) -> str:
    """``"Animals & Nature"`` -> ``"animals-nature"`` (the CATEGORY of ``emoji:ARTIST:CATEGORY``)."""
    return re.sub(r"[^a-z0-9]+", "-", category.lower()).strip("-")


def _check_artist(artist: str) -> None:
    if artist not in ARTISTS:
        raise DataError(f"unknown emoji artist {artist!r} (expected one of {', '.join(ARTISTS)})")


@functools.cache
def _arrays(artist: str) -> dict[str, np.ndarray]:
    _check_artist(artist)
    path = EMOJI_DIR / f"{artist}.npz"
    if not path.is_file():
        raise DataError(f"emoji:{artist}: the shipped array {path} is missing (rebuild with scripts/build_emoji.py)")
    with np.load(path, allow_pickle=False) as z:
        if set(z.files) != _KEYS:
            raise DataError(f"{path}: expected the arrays {sorted(_KEYS)}, found {sorted(z.files)}")
        out = {k: z[k] for k in z.files}
    n = len(out["images"])
    if out["images"].dtype != np.uint8 or out["images"].shape[1:] != (EMOJI_SIZE, EMOJI_SIZE, 3):
        raise DataError(f"{path}: images must be uint8 (N, {EMOJI_SIZE}, {EMOJI_SIZE}, 3)")
    if any(out[k].shape != (n,) for k in ("labels", *_META)) or tuple(out["classes"].tolist()) != EMOJI_CATEGORIES:
        raise DataError(f"{path}: metadata arrays do not match the images or the emoji categories")
    for a in out.values():
        a.flags.writeable = False
    return out


def _indices(artist: str, category: str | None) -> np.ndarray:
    labels = _arrays(artist)["labels"]
    if category is None:
        return np.arange(len(labels))
    slugs = [category_slug(c) for c in EMOJI_CATEGORIES]
    if category not in slugs:
        raise DataError(f"emoji:{artist}:{category}: unknown emoji category (expected one of {', '.join(slugs)})")
    idx = np.flatnonzero(labels == slugs.index(category))
    if not len(idx):
        raise DataError(f"emoji:{artist}:{category}: no shipped subject is in this category")
    return idx


def emoji(artist: str, category: str | None = None) -> Source:
    """The shipped emoji of ``artist`` (a key of :data:`ARTISTS`) as a labelled 32x32 RGB source.

    ``category`` (a slug such as ``"animals-nature"``) keeps one category; the classes stay the 10 Unicode
    categories. The id is the spec that resolves to it: ``emoji:<artist>`` or ``emoji:<artist>:<category>``.
    Captions: the Unicode name and subcategory (:func:`cdm.data.captions.emoji_caption`).
    """
    a = _arrays(artist)
    idx = _indices(artist, category)
    id = f"emoji:{artist}" if category is None else f"emoji:{artist}:{category}"
    captions = tuple(emoji_caption(str(n), str(s)) for n, s in zip(a["names"][idx], a["subcategories"][idx],
                                                                     strict=True))
    return Source(id=id, images=a["images"][idx], labels=a["labels"][idx], classes=EMOJI_CATEGORIES,
                  captions=captions)


def emoji_metadata(artist: str, category: str | None = None) -> dict[str, np.ndarray]:
    """Per-image str arrays aligned with :func:`emoji` ``(artist, category)``: ``names`` (Unicode names),
    ``subcategories``, ``codepoints`` (lower-case hex joined by ``-``) and ``categories`` (class names)."""
    a = _arrays(artist)
    idx = _indices(artist, category)
    out = {k: a[k][idx] for k in _META}
    out["categories"] = np.asarray(EMOJI_CATEGORIES, dtype=str)[a["labels"][idx]]
    return out


def emoji_license(artist: str) -> str:
    """The licence text that covers the shipped images of ``artist``."""
    _check_artist(artist)
    return (EMOJI_DIR / "licenses" / LICENSE_FILES[ARTISTS[artist][1]]).read_text(encoding="utf-8")


def license_of(source_id: str) -> str | None:
    """The SPDX licence of a source whose id (or spec) names shipped emoji, ``emoji:ARTIST...`` (split suffixes
    and fits keep the prefix); None for anything else. ``cdm add`` records it as the tag ``license:<SPDX>``."""
    m = re.match(r"emoji:([a-z0-9_-]+)", source_id)
    return ARTISTS[m[1]][1] if m and m[1] in ARTISTS else None


def emoji_from_spec(spec: str) -> Source:
    """Resolve ``emoji:ARTIST`` or ``emoji:ARTIST:CATEGORY`` (no split suffixes; :func:`load_source` peels those)."""
    m = _SPEC.fullmatch(spec)
    if not m:
        raise DataError(f"{spec}: bad emoji spec (expected emoji:ARTIST or emoji:ARTIST:CATEGORY)")
    return emoji(m["artist"], m["category"])
