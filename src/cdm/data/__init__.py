"""Data for cdm: immutable image sources, the embedded MNIST digits, synthetic glyphs, user files, splits.

Images are uint8 of one :class:`ImageSpec` per source: (N, H, W) grey or (N, H, W, 3) RGB. The embedded digits
and glyphs are 28x28 grey, white ink (255) on black (0), MNIST style. A :class:`Source` has a stable id and a
content hash that does not depend on sample order; :func:`load_source` resolves command-line specs.
"""

from .emoji import ARTISTS as EMOJI_ARTISTS
from .emoji import EMOJI_CATEGORIES, emoji, emoji_license, emoji_metadata, license_of
from .files import FILTERS, fit, load_folder, load_npz
from .glyphs import CHARSETS, FONT_NAMES, available_fonts, glyphs
from .mnist import MNIST_CLASSES, PUBLIC_PER_CLASS, mnist, public_protected
from .resolve import SPEC_HELP, load_source
from .source import IMAGE_SIZE, Source, concat_sources
from .spec import MNIST_SPEC, ImageSpec
from .splits import split_by_classes, split_stratified

__all__ = [
    "CHARSETS",
    "EMOJI_ARTISTS",
    "EMOJI_CATEGORIES",
    "FILTERS",
    "FONT_NAMES",
    "IMAGE_SIZE",
    "ImageSpec",
    "MNIST_SPEC",
    "MNIST_CLASSES",
    "PUBLIC_PER_CLASS",
    "SPEC_HELP",
    "Source",
    "available_fonts",
    "concat_sources",
    "emoji",
    "emoji_license",
    "emoji_metadata",
    "license_of",
    "fit",
    "glyphs",
    "load_folder",
    "load_npz",
    "load_source",
    "mnist",
    "public_protected",
    "split_by_classes",
    "split_stratified",
]
