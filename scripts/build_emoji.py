#!/usr/bin/env python
"""Rebuild the shipped emoji arrays in ``src/cdm/data/emoji/`` from the registry packages.

Not run in CI: the arrays are committed and cdm reads them directly (it never needs cairosvg). To rebuild::

    mkdir -p /tmp/emoji-build && cd /tmp/emoji-build
    npm pack emoji-datasource-google@16.0.0 emoji-datasource-twitter@16.0.0 openmoji@17.0.0 \\
        fluentui-emoji@1.3.0 spdx-license-list
    for f in *.tgz; do d=${f%-*.tgz}; mkdir -p "$d" && tar xzf "$f" -C "$d"; done
    apt-get download ruby-gemojione && mkdir -p gemojione && dpkg-deb -x ruby-gemojione_3.3.0-1_all.deb gemojione
    pip install cairosvg          # build-time only
    python scripts/build_emoji.py /tmp/emoji-build

Subjects are the entries of emoji-datasource's ``emoji.json`` (base emoji; no skin-tone variants), in its
``sort_order``; each is kept only if all five artists draw it. Other sets are matched by codepoint sequence
(lower-case hex joined by ``-``, compared with FE0F removed); Fluent Emoji is matched by the CLDR name (from
OpenMoji's ``annotation``, else emoji-datasource's name) turned into its file name. Every image is composited
onto white (SVGs rendered at 128 px by cairosvg, PNGs at 64 px), then reduced to 32x32 with Lanczos.

Writes ``<artist>.npz`` (uint8 ``images`` (N, 32, 32, 3), int64 ``labels``, str ``classes``, ``names``,
``subcategories``, ``codepoints``; no pickles) for noto, twemoji, openmoji, fluent and emojione, all in the same
subject order, and the licence texts in ``licenses/``.
"""

from __future__ import annotations

import argparse
import io
import json
import re
import shutil
import sys
import unicodedata
from pathlib import Path

import numpy as np
from PIL import Image

from cdm.data.emoji import ARTISTS as EMOJI_ARTISTS
from cdm.data.emoji import EMOJI_CATEGORIES

SIZE = 32
SVG_PX = 128
OUT = Path(__file__).resolve().parents[1] / "src" / "cdm" / "data" / "emoji"
CATEGORIES = EMOJI_CATEGORIES  # the classes, in label order (cdm.data.emoji reads them back)
ARTISTS = tuple(EMOJI_ARTISTS)
GEMOJIONE = "gemojione/usr/share/rubygems-integration/all/gems/gemojione-3.3.0"


def key(codepoints: str) -> str:
    """Normalised codepoint sequence: lower-case hex, '-' joined, FE0F dropped."""
    parts = [p.lower().lstrip("0") or "0" for p in re.split(r"[-_ ]", codepoints.strip()) if p]
    return "-".join(p for p in parts if p != "fe0f")


def slug(name: str) -> str:
    """A CLDR name as Fluent Emoji's file name: 'one o’clock' -> 'one-oclock'."""
    name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()  # piñata -> pinata
    name = name.lower().replace("’", "").replace("'", "").replace("keycap: #", "keycap hashtag")
    name = name.replace("keycap: *", "keycap asterisk")
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-")


def on_white(img: Image.Image) -> np.ndarray:
    rgba = np.asarray(img.convert("RGBA"), dtype=np.float64)
    alpha = rgba[..., 3:] / 255.0
    rgb = rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)
    big = Image.fromarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8), "RGB")
    return np.asarray(big.resize((SIZE, SIZE), Image.Resampling.LANCZOS), dtype=np.uint8)


def png(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return on_white(img)


def svg(path: Path) -> np.ndarray:
    import cairosvg  # build-time only

    data = cairosvg.svg2png(url=str(path), output_width=SVG_PX, output_height=SVG_PX)
    with Image.open(io.BytesIO(data)) as img:
        return on_white(img)


def build(root: Path) -> None:
    ds = json.loads((root / "emoji-datasource-google/package/emoji.json").read_text())
    ds.sort(key=lambda e: e["sort_order"])
    openmoji = json.loads((root / "openmoji/package/data/openmoji.json").read_text())
    om_by_key = {key(e["hexcode"]): e for e in openmoji if not e.get("skintone")}
    om_dir = root / "openmoji/package/color/svg"
    om_files = {key(p.stem): p for p in om_dir.glob("*.svg")}
    g_dir = root / GEMOJIONE / "assets/png"
    g_files = {key(p.stem): p for p in g_dir.glob("*.png")}
    fl_dir = root / "fluentui-emoji/package/icons/flat"
    fl_files = {p.stem: p for p in fl_dir.glob("*.svg")}
    noto_dir = root / "emoji-datasource-google/package/img/google/64"
    tw_dir = root / "emoji-datasource-twitter/package/img/twitter/64"

    subjects = []
    for e in ds:
        k = key(e["unified"])
        paths = {"noto": noto_dir / e["image"], "twemoji": tw_dir / e["image"]}
        if k in om_files:
            paths["openmoji"] = om_files[k]
        if k in g_files:
            paths["emojione"] = g_files[k]
        names = [om_by_key[k]["annotation"]] if k in om_by_key else []
        names += [e["name"], *e.get("short_names", [])]
        for name in names:
            s = slug(name)
            if s in fl_files or f"{s}-default" in fl_files:
                paths["fluent"] = fl_files.get(s) or fl_files[f"{s}-default"]
                break
        missing = [a for a in ARTISTS if a not in paths or not paths[a].is_file()]
        if not missing:
            subjects.append((e, paths))
    print(f"{len(subjects)} of {len(ds)} subjects are drawn by all five artists", file=sys.stderr)

    OUT.mkdir(parents=True, exist_ok=True)
    meta = {
        "labels": np.array([CATEGORIES.index(e["category"]) for e, _ in subjects], dtype=np.int64),
        "classes": np.array(CATEGORIES, dtype=str),
        "names": np.array([e["name"] for e, _ in subjects], dtype=str),
        "subcategories": np.array([e["subcategory"] for e, _ in subjects], dtype=str),
        "codepoints": np.array([e["unified"].lower() for e, _ in subjects], dtype=str),
    }
    for artist in ARTISTS:
        load = png if artist in ("noto", "twemoji", "emojione") else svg
        images = np.stack([load(paths[artist]) for _, paths in subjects])
        np.savez_compressed(OUT / f"{artist}.npz", images=images, **meta)
        print(f"{artist}: {images.shape} -> {(OUT / f'{artist}.npz').stat().st_size} bytes", file=sys.stderr)

    lic = OUT / "licenses"
    lic.mkdir(exist_ok=True)
    spdx = root / "spdx/package/licenses"
    for name in ("Apache-2.0", "CC-BY-4.0"):
        (lic / f"{name}.txt").write_text(json.loads((spdx / f"{name}.json").read_text())["licenseText"])
    shutil.copyfile(root / "openmoji/package/LICENSE.txt", lic / "CC-BY-SA-4.0.txt")
    mit = json.loads((spdx / "MIT.json").read_text())["licenseText"]
    mit = re.sub(r"Copyright \(c\) <year> <copyright holders>", "Copyright (c) Microsoft Corporation.", mit)
    (lic / "MIT-fluentui-emoji.txt").write_text(
        mit
        + "\n\n----- LICENSE of the npm package fluentui-emoji@1.3.0 (the repackaging used) -----\n\n"
        + (root / "fluentui-emoji/package/LICENSE").read_text()
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="folder with the unpacked packages (see the module docstring)")
    build(parser.parse_args().root)


if __name__ == "__main__":
    main()
