"""``Source``: a named, immutable set of uint8 images of one :class:`~cdm.data.ImageSpec`, optionally labelled
and optionally captioned."""

from __future__ import annotations

import bisect
import functools
import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from io import BytesIO

import numpy as np

from ..errors import DataError
from .spec import ImageSpec

__all__ = ["IMAGE_SIZE", "MIN_ID_PREFIX", "Source", "concat_sources"]

IMAGE_SIZE = 28  # the side of the embedded digits and glyphs (other sources: any ImageSpec)
MIN_ID_PREFIX = 12  # shortest sample-hash prefix accepted as a sample id


def _readonly_images(images: object, id: str) -> np.ndarray:
    ImageSpec.of(images, id)  # uint8 (N, H, W) or (N, H, W, 3)
    if images.flags.writeable or not images.flags.c_contiguous:
        images = np.array(images, dtype=np.uint8, order="C", copy=True)
        images.flags.writeable = False
    return images


def _readonly_labels(labels: object, n: int, classes: tuple[str, ...], id: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.dtype.kind not in "iu":
        raise DataError(f"{id}: labels must be an integer array")
    if labels.shape != (n,):
        raise DataError(f"{id}: labels have shape {labels.shape}, expected ({n},)")
    if n and (labels.min() < 0 or labels.max() >= len(classes)):
        raise DataError(f"{id}: labels must lie in 0..{len(classes) - 1} (one per class name)")
    out = np.array(labels, dtype=np.int64, copy=True)
    out.flags.writeable = False
    return out


MAX_CAPTION = 1000  # characters in one caption


def _captions(captions: object, n: int, id: str) -> tuple[str, ...]:
    if isinstance(captions, str):
        raise DataError(f"{id}: captions must be one string per image, not a single string")
    out = tuple(str(c) if isinstance(c, np.str_) else c for c in captions)
    if len(out) != n:
        raise DataError(f"{id}: {len(out)} captions for {n} images")
    bad = [i for i, c in enumerate(out) if not isinstance(c, str) or not c.strip() or len(c) > MAX_CAPTION]
    if bad:
        raise DataError(f"{id}: caption {bad[0]} must be a non-empty string of at most {MAX_CAPTION} characters")
    return out


@dataclass(frozen=True, eq=False)
class Source:
    """uint8 images, read-only: ``(N, H, W)`` grey or ``(N, H, W, 3)`` RGB (:attr:`spec`); the embedded digits
    are 28x28 grey, white ink (255) on black (0).

    ``labels`` (int64, length N) index into ``classes`` (the class names); an unlabelled source has
    ``labels=None`` and ``classes=()``. ``id`` is a stable, human-readable name such as ``"mnist/protected"``;
    the identity of the content is :attr:`content_hash`. Sources compare by identity: compare content hashes.

    ``captions`` (one non-empty string per image, or None) describe the images in words, e.g. ``"red apple,
    food-fruit"``: what text-conditioned compartments train on. They are data of the source: part of its
    content hash, kept, subset and forgotten with their images.
    """

    id: str
    images: np.ndarray
    labels: np.ndarray | None = None
    classes: tuple[str, ...] = field(default=())
    captions: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id:
            raise DataError(f"source id must be a non-empty string, got {self.id!r}")
        images = _readonly_images(self.images, self.id)
        classes = tuple(self.classes)
        if not all(isinstance(c, str) and c for c in classes) or len(set(classes)) != len(classes):
            raise DataError(f"{self.id}: class names must be distinct non-empty strings, got {classes!r}")
        if self.labels is None:
            if classes:
                raise DataError(f"{self.id}: class names given for an unlabelled source")
            labels = None
        else:
            if not classes:
                raise DataError(f"{self.id}: labels given without class names")
            labels = _readonly_labels(self.labels, len(images), classes, self.id)
        object.__setattr__(self, "images", images)
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "classes", classes)
        if self.captions is not None:
            object.__setattr__(self, "captions", _captions(self.captions, len(images), self.id))

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __repr__(self) -> str:
        return f"Source(id={self.id!r}, n={len(self)}, classes={len(self.classes)})"

    @property
    def spec(self) -> ImageSpec:
        """Height, width and channels of its images."""
        return ImageSpec.of(self.images, self.id)

    @property
    def labelled(self) -> bool:
        """Whether the samples carry class labels."""
        return self.labels is not None

    @property
    def captioned(self) -> bool:
        """Whether the samples carry captions."""
        return self.captions is not None

    @functools.cached_property
    def sample_hashes(self) -> tuple[str, ...]:
        """SHA-256 (hex) of each image's raw bytes (uint8, C order: 784 bytes for a 28x28 grey digit).

        The label is not hashed: a sample hash identifies the image content, so the same picture has the same
        id in every source and under any label.
        """
        return tuple(hashlib.sha256(img.tobytes()).hexdigest() for img in self.images)

    @functools.cached_property
    def content_hash(self) -> str:
        """A Merkle-style root over the samples, independent of their order.

        Recipe: sort the samples by (sample hash, label); take the sorted sample hashes joined by ``"\\n"``;
        if the source is labelled append ``"\\n"`` and the labels in that order as decimal integers joined by
        ``","``; if it is captioned append ``"\n"`` and the JSON list of the captions in that order (the sort
        key is then (sample hash, label, caption)); the root is the SHA-256 hex of that UTF-8 text. Class names
        and ``id`` are not part of it.
        """
        order = self._hash_order()
        hashes = self.sample_hashes
        text = "\n".join(hashes[i] for i in order)
        if self.labels is not None:
            text += "\n" + ",".join(str(int(self.labels[i])) for i in order)
        if self.captions is not None:
            text += "\n" + json.dumps([self.captions[i] for i in order], ensure_ascii=False)
        return hashlib.sha256(text.encode()).hexdigest()

    def _hash_order(self) -> list[int]:
        hashes, labels, captions = self.sample_hashes, self.labels, self.captions
        if labels is None and captions is None:
            return sorted(range(len(self)), key=hashes.__getitem__)
        return sorted(range(len(self)), key=lambda i: (hashes[i], -1 if labels is None else int(labels[i]),
                                                       "" if captions is None else captions[i]))

    @functools.cached_property
    def _sorted_unique_hashes(self) -> list[str]:
        return sorted(set(self.sample_hashes))

    def _resolve_id(self, sample_id: str) -> str:
        """The full sample hash that ``sample_id`` (full hex or a unique prefix of >= 12 chars) names."""
        if not isinstance(sample_id, str):
            raise DataError(f"{self.id}: sample id must be a hex string, got {sample_id!r}")
        key = sample_id.strip().lower()
        if len(key) < MIN_ID_PREFIX or len(key) > 64 or any(c not in "0123456789abcdef" for c in key):
            raise DataError(
                f"{self.id}: sample id {sample_id!r} is not a sha256 hex digest"
                f" or a prefix of >= {MIN_ID_PREFIX} hex chars"
            )
        table = self._sorted_unique_hashes
        lo = bisect.bisect_left(table, key)
        matches = []
        for h in table[lo:]:
            if not h.startswith(key):
                break
            matches.append(h)
            if len(matches) > 1:
                raise DataError(f"{self.id}: sample id {sample_id!r} is ambiguous (matches several samples)")
        if not matches:
            raise DataError(f"{self.id}: no sample with id {sample_id!r}")
        return matches[0]

    def index_of(self, sample_id: str) -> int:
        """Index of the first sample whose hash is ``sample_id`` (full hex or a unique prefix of >= 12 chars)."""
        return self.sample_hashes.index(self._resolve_id(sample_id))

    def subset(self, indices: Sequence[int] | np.ndarray, id: str) -> Source:
        """The samples at ``indices`` (in that order) as a new source named ``id``, with the same classes."""
        arr = np.asarray(indices)
        if arr.dtype == np.bool_:
            if arr.shape != (len(self),):
                raise DataError(f"{self.id}: a boolean subset mask must have shape ({len(self)},)")
            arr = np.flatnonzero(arr)
        idx = arr.astype(np.int64).reshape(-1)
        if idx.size and (idx.min() < -len(self) or idx.max() >= len(self)):
            raise DataError(f"{self.id}: subset index out of range for {len(self)} samples")
        labels = None if self.labels is None else self.labels[idx]
        captions = None if self.captions is None else tuple(self.captions[i] for i in idx.tolist())
        return Source(id=id, images=self.images[idx], labels=labels, classes=self.classes, captions=captions)

    def without(self, sample_ids: Iterable[str], id: str | None = None) -> Source:
        """This source minus every sample whose image hash is listed (full hex or unique >= 12-char prefix).

        Every copy of a listed image is removed. An unknown or ambiguous id is a :class:`DataError`. The default
        ``id`` is ``"<id>/without<k>-<8 hex>"``: ``k`` hashes removed, and the start of the SHA-256 of their sorted
        full hashes joined by newlines.
        """
        if isinstance(sample_ids, str):
            sample_ids = [sample_ids]
        drop = sorted({self._resolve_id(s) for s in sample_ids})
        dropped = set(drop)
        keep = [i for i, h in enumerate(self.sample_hashes) if h not in dropped]
        if id is None:
            tag = hashlib.sha256("\n".join(drop).encode()).hexdigest()[:8]
            id = f"{self.id}/without{len(drop)}-{tag}"
        return self.subset(keep, id)

    def class_counts(self) -> dict[str, int]:
        """Samples per class name, in class order (zeros included); ``{}`` for an unlabelled source."""
        if self.labels is None:
            return {}
        counts = np.bincount(self.labels, minlength=len(self.classes))
        return {name: int(c) for name, c in zip(self.classes, counts, strict=True)}

    def describe(self) -> dict[str, object]:
        """A JSON-ready summary: id, n, content_hash, classes, counts, captioned."""
        return {
            "id": self.id,
            "n": len(self),
            "content_hash": self.content_hash,
            "classes": list(self.classes),
            "counts": self.class_counts(),
            "captioned": self.captioned,
        }

    def to_npz(self, path: str | os.PathLike) -> None:
        """Write ``images`` (+ ``labels`` and ``classes`` if labelled, ``captions`` if captioned) as a compressed
        .npz, atomically.

        The archive holds no pickles; :func:`cdm.data.load_npz` reads it back.
        """
        from ..io import atomic_write_bytes  # deferred: cdm.io imports torch

        buf = BytesIO()
        arrays = {"images": self.images}  # plain uint8 / int64 / str arrays: nothing is pickled
        if self.labels is not None:
            arrays.update(labels=self.labels, classes=np.array(self.classes, dtype=str))
        if self.captions is not None:
            arrays["captions"] = np.array(self.captions, dtype=str)
        np.savez_compressed(buf, **arrays)
        atomic_write_bytes(path, buf.getvalue())


def concat_sources(sources: list[Source], id: str) -> Source:
    """The union of several sources (the paragon's data, the backbone's public set plus glyphs)."""
    if not sources:
        raise DataError("no sources to concatenate")
    classes = sources[0].classes
    if any(s.classes != classes or s.labelled != sources[0].labelled for s in sources):
        raise DataError("sources to concatenate must share their class names and all be labelled or not")
    specs = {s.spec for s in sources}
    if len(specs) > 1:
        raise DataError(f"sources to concatenate must share their image spec, got {', '.join(map(str, specs))}")
    if any(s.captioned != sources[0].captioned for s in sources):
        raise DataError("sources to concatenate must all be captioned or none")
    labels = np.concatenate([s.labels for s in sources]) if sources[0].labelled else None
    captions = sum((s.captions for s in sources), ()) if sources[0].captioned else None
    return Source(id=id, images=np.concatenate([s.images for s in sources]), labels=labels, classes=classes,
                  captions=captions)
