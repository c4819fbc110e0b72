"""Data for cdm: immutable image sources, the embedded MNIST digits, synthetic glyphs, user files, splits.

Every image is 28x28 uint8, white ink (255) on black (0), MNIST style. A :class:`Source` has a stable id and a
content hash that does not depend on sample order; :func:`load_source` resolves command-line specs.
"""

from .files import load_folder, load_npz
from .glyphs import CHARSETS, FONT_NAMES, available_fonts, glyphs
from .mnist import MNIST_CLASSES, PUBLIC_PER_CLASS, mnist, public_protected
from .resolve import SPEC_HELP, load_source
from .source import IMAGE_SIZE, Source, concat_sources
from .splits import split_by_classes, split_stratified

__all__ = [
    "CHARSETS",
    "FONT_NAMES",
    "IMAGE_SIZE",
    "MNIST_CLASSES",
    "PUBLIC_PER_CLASS",
    "SPEC_HELP",
    "Source",
    "available_fonts",
    "concat_sources",
    "glyphs",
    "load_folder",
    "load_npz",
    "load_source",
    "mnist",
    "public_protected",
    "split_by_classes",
    "split_stratified",
]
