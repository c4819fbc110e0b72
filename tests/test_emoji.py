"""Tests for the shipped emoji sources (cdm.data.emoji) and their specs."""

from __future__ import annotations

import numpy as np
import pytest

from cdm.data import EMOJI_ARTISTS, EMOJI_CATEGORIES, emoji, emoji_license, emoji_metadata, load_source
from cdm.data.emoji import EMOJI_DIR, category_slug
from cdm.errors import DataError


@pytest.mark.parametrize("artist", sorted(EMOJI_ARTISTS))
def test_each_artist_is_a_32x32_rgb_labelled_source(artist):
    src = emoji(artist)
    assert src.id == f"emoji:{artist}"
    assert src.images.dtype == np.uint8 and src.images.shape[1:] == (32, 32, 3)
    assert src.classes == EMOJI_CATEGORIES and len(src.classes) == 10
    assert len(src) > 800 and src.labels is not None
    assert len(set(src.labels.tolist())) >= 8  # Component is empty, Flags nearly so (Fluent has no country flags)
    assert src.images.mean() > 128  # drawn on white
    assert (src.images.reshape(len(src), -1) == 255).all(axis=1).sum() == 0  # no blank (missing) image
    meta = emoji_metadata(artist)
    assert set(meta) == {"names", "subcategories", "codepoints", "categories"}
    assert all(len(v) == len(src) and v.dtype.kind == "U" for v in meta.values())
    assert list(meta["categories"]) == [src.classes[c] for c in src.labels]


def test_same_subject_order_for_every_artist():
    ref = emoji_metadata("noto")
    ref_labels = emoji("noto").labels
    for artist in EMOJI_ARTISTS:
        meta = emoji_metadata(artist)
        for k in ("names", "subcategories", "codepoints"):
            assert np.array_equal(meta[k], ref[k]), (artist, k)
        assert np.array_equal(emoji(artist).labels, ref_labels)
    assert len(set(ref["codepoints"].tolist())) == len(ref["codepoints"])  # one image per subject
    assert "GRINNING FACE" in ref["names"] and "1f600" in ref["codepoints"]


def test_artists_draw_the_same_subject_differently():
    i = int(np.flatnonzero(emoji_metadata("noto")["codepoints"] == "1f600")[0])
    hashes = {artist: emoji(artist).sample_hashes[i] for artist in EMOJI_ARTISTS}
    assert len(set(hashes.values())) == len(EMOJI_ARTISTS)
    assert len({emoji(a).content_hash for a in EMOJI_ARTISTS}) == len(EMOJI_ARTISTS)


def test_licences_and_attribution_are_shipped():
    readme = (EMOJI_DIR / "README.md").read_text(encoding="utf-8")
    expected = {"Apache-2.0": "Apache License", "CC-BY-4.0": "Attribution 4.0", "MIT": "Microsoft Corporation"}
    expected["CC-BY-SA-4.0"] = "Attribution-ShareAlike 4.0"
    for artist, (name, licence, url) in EMOJI_ARTISTS.items():
        assert expected[licence] in emoji_license(artist)
        assert f"`{artist}.npz`" in readme and licence in readme and name.split(" (")[0] in readme
        assert url.startswith("https://")
    assert "CC-BY-SA-4.0" in readme and "scripts/build_emoji.py" in readme


def test_no_apple_or_facebook_images_are_shipped():
    names = [p.name.lower() for p in EMOJI_DIR.rglob("*")]
    assert not any(word in n for n in names for word in ("apple", "facebook", "messenger"))
    assert {p.stem for p in EMOJI_DIR.glob("*.npz")} == set(EMOJI_ARTISTS)


def test_specs_resolve_with_category_filters_and_splits():
    src = load_source("emoji:twemoji")
    assert src.id == "emoji:twemoji" and src.content_hash == emoji("twemoji").content_hash
    animals = load_source("emoji:twemoji:animals-nature")
    c = EMOJI_CATEGORIES.index("Animals & Nature")
    assert animals.classes == EMOJI_CATEGORIES and len(animals) == int((src.labels == c).sum()) > 50
    assert set(animals.labels.tolist()) == {c}
    assert load_source(animals.id).content_hash == animals.content_hash
    low, high = load_source("emoji:twemoji/classes[0-4|5-9]-0"), load_source("emoji:twemoji/classes[0-4|5-9]-1")
    assert len(low) + len(high) == len(src)
    assert set(low.labels.tolist()) <= set(range(5)) and set(high.labels.tolist()) <= set(range(5, 10))
    assert load_source(high.id).content_hash == high.content_hash
    parts = [load_source(f"emoji:openmoji/strat8-{j}") for j in range(8)]
    assert sum(len(p) for p in parts) == len(emoji("openmoji"))
    assert category_slug("Smileys & Emotion") == "smileys-emotion"


BAD_SPECS = ["emoji:apple", "emoji:facebook", "emoji:twemoji:nope", "emoji:", "emoji:noto:component", "emoji:noto:a:b"]


@pytest.mark.parametrize("spec", BAD_SPECS)
def test_bad_emoji_specs_fail(spec):
    with pytest.raises(DataError):
        load_source(spec)
