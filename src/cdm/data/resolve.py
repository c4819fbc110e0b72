"""``load_source``: turn a command-line string into a Source."""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import DataError
from .emoji import emoji_from_spec
from .files import load_folder, load_npz
from .glyphs import CHARSETS, glyphs
from .mnist import mnist, public_protected
from .source import Source
from .splits import split_by_classes, split_stratified

__all__ = ["DEFAULT_GLYPHS_N", "SPEC_HELP", "load_source"]

DEFAULT_GLYPHS_N = 5000

SPEC_HELP = """\
accepted sources:
  mnist | mnist/public | mnist/protected          the embedded 5,000 MNIST digits and their fixed partition
  glyphs[:CHARSET][:N][:seed=S]                   synthetic glyphs; CHARSET digits|letters|all (default digits),
                                                  N samples (default 5000, also n=N), seed S (default 0)
  glyphs/CHARSET-sS-nN                            the same, spelled as the id glyphs() gives its sources
  emoji:ARTIST[:CATEGORY]                         shipped 32x32 RGB emoji labelled by Unicode category; ARTIST noto|
                                                  twemoji|openmoji|fluent|emojione, CATEGORY a slug such as
                                                  animals-nature (keeps the 10 classes); same subjects per artist
  PATH                                            a folder of PNG/JPEG images, or an .npz archive
then any number of split suffixes:
  .../stratK-J  or  .../stratKsSEED-J             part J (0-based) of a stratified split into K parts
  .../classes[GROUPS]-J                           part J of a split by classes, e.g. classes[0-4|5-9]-0;
                                                  groups separated by |, labels by , with ranges a-b"""

_MNIST = ("mnist", "mnist/public", "mnist/protected")
_GLYPH_ID = re.compile(r"glyphs/(?P<charset>[a-z]+)-s(?P<seed>\d+)-n(?P<n>\d+)")
_STRAT = re.compile(r"(?P<base>.+)/strat(?P<k>\d+)(?:s(?P<seed>\d+))?-(?P<j>\d+)")
_CLASSES = re.compile(r"(?P<base>.+)/classes\[(?P<groups>[0-9,|\- ]+)\]-(?P<j>\d+)")


def load_source(spec: str) -> Source:
    """Resolve a source spec; the grammar is in :data:`SPEC_HELP`.

    Names (mnist, glyphs, emoji...) win over paths of the same spelling; write ``./mnist`` for a folder named mnist.
    A path is tried whole before split suffixes are peeled off its end, so a folder may be called ``strat2-0``.
    Ids of the sources returned are specs that resolve to the same content.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise DataError(f"empty source spec\n{SPEC_HELP}")
    spec = spec.strip()
    if spec in _MNIST:
        if spec == "mnist":
            return mnist()
        public, protected = public_protected()
        return public if spec == "mnist/public" else protected
    if spec == "glyphs" or (spec.startswith("glyphs:") and "/" not in spec):
        return _glyphs_from_options(spec)
    if m := _GLYPH_ID.fullmatch(spec):
        return _glyphs(spec, m["charset"], int(m["n"]), int(m["seed"]))
    if spec.startswith("emoji:") and "/" not in spec:
        return emoji_from_spec(spec)
    path = Path(spec)
    if path.is_dir():
        return load_folder(path, id=spec.rstrip("/") or spec)
    if path.is_file():
        if path.suffix.lower() != ".npz":
            raise DataError(f"{spec}: a file source must be an .npz archive (or give a folder of images)")
        return load_npz(path, id=spec)
    if m := _STRAT.fullmatch(spec):
        k, j, seed = int(m["k"]), int(m["j"]), int(m["seed"] or 0)
        if j >= k:
            raise DataError(f"{spec}: part {j} does not exist in a split into {k} parts (0..{k - 1})")
        return split_stratified(load_source(m["base"]), k, seed=seed)[j]
    if m := _CLASSES.fullmatch(spec):
        groups = _parse_groups(m["groups"], spec)
        j = int(m["j"])
        if j >= len(groups):
            raise DataError(f"{spec}: part {j} does not exist for {len(groups)} class groups (0..{len(groups) - 1})")
        return split_by_classes(load_source(m["base"]), groups)[j]
    raise DataError(f"{spec}: unknown source (not a name, an existing folder or .npz, or a split of one)\n{SPEC_HELP}")


def _glyphs(spec: str, charset: str, n: int, seed: int) -> Source:
    if charset not in CHARSETS:
        raise DataError(f"{spec}: unknown glyph charset {charset!r} (expected {', '.join(CHARSETS)})")
    return glyphs(n, seed=seed, charset=charset)  # type: ignore[arg-type]


def _glyphs_from_options(spec: str) -> Source:
    charset, n, seed = None, None, None
    for option in spec.split(":")[1:]:
        option = option.strip()
        if option in CHARSETS and charset is None:
            charset = option
        elif (m := re.fullmatch(r"(?:n=)?(\d+)", option)) and n is None:
            n = int(m[1])
        elif (m := re.fullmatch(r"seed=(\d+)", option)) and seed is None:
            seed = int(m[1])
        else:
            raise DataError(f"{spec}: bad or repeated glyphs option {option!r}\n{SPEC_HELP}")
    return _glyphs(spec, charset or "digits", DEFAULT_GLYPHS_N if n is None else n, seed or 0)


def _parse_groups(text: str, spec: str) -> list[list[int]]:
    groups: list[list[int]] = []
    for group in text.split("|"):
        labels: list[int] = []
        for item in group.split(","):
            m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", item)
            if not m or (m[2] is not None and int(m[2]) < int(m[1])):
                raise DataError(f"{spec}: bad class group item {item!r} (expected a label or a range a-b)")
            labels.extend(range(int(m[1]), int(m[2] or m[1]) + 1))
        groups.append(labels)
    return groups
