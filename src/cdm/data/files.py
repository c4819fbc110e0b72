"""A user's own images: a folder of PNG/JPEG files, or an .npz archive (never pickles).

Grey folders are read MNIST style (28x28, white ink on black, inverted when drawn dark on light), as the
embedded digits are. A folder with colour (or transparent) images is an RGB source: transparency is composited
onto a stated background (white by default) and every image keeps its size (they must agree, or give an
:class:`~cdm.data.ImageSpec` to fit them to). An ``.npz`` keeps its arrays as stored, of any size. To give a
backbone what it needs, :func:`fit` resizes (a stated filter) and converts channels. Any problem is a
:class:`DataError` naming the file.
"""

from __future__ import annotations

import os
import zipfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import DataError
from .source import IMAGE_SIZE, Source
from .spec import ImageSpec

__all__ = ["FILTERS", "IMAGE_SUFFIXES", "fit", "load_folder", "load_npz", "to_mnist_style"]

FILTERS = {"lanczos": Image.Resampling.LANCZOS, "bilinear": Image.Resampling.BILINEAR,
           "bicubic": Image.Resampling.BICUBIC, "nearest": Image.Resampling.NEAREST, "box": Image.Resampling.BOX}
WHITE = (255, 255, 255)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})
_GRAY_TOLERANCE = 2  # colour channels may differ by this many levels and still count as grey
_NPZ_KEYS = ("images", "labels", "classes", "captions")
_SPEC_KEYS = ("height", "width", "channels")  # optional: the image spec, as sample files carry it


def _is_image_file(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_SUFFIXES


def _gray_array(img: Image.Image, name: str) -> np.ndarray:
    """The image as a 2-D uint8 array; colour is accepted only if it is grey stored as colour, fully opaque."""
    mode = img.mode
    if mode == "L":
        return np.asarray(img, dtype=np.uint8)
    if mode == "1":
        return np.asarray(img.convert("L"), dtype=np.uint8)
    if mode.startswith("I"):  # 16-bit grey (I;16, I;16B, I): scale 0..65535 to 0..255
        wide = np.asarray(img, dtype=np.float64)
        return np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8)
    if mode == "F":
        raise DataError(f"{name}: floating-point images are not supported")
    if mode not in ("LA", "RGB", "RGBA"):  # palette, CMYK, YCbCr, ...: compare the colour channels
        has_alpha = "A" in img.getbands() or "transparency" in img.info
        img = img.convert("RGBA" if has_alpha else "RGB")
    arr = np.asarray(img, dtype=np.int16)
    if img.mode in ("LA", "RGBA"):
        if arr[..., -1].min() < 255:
            raise DataError(f"{name}: image has transparent pixels; cdm needs opaque single-channel images")
        arr = arr[..., :-1]
    if arr.shape[-1] > 1 and int((arr.max(axis=-1) - arr.min(axis=-1)).max()) > _GRAY_TOLERANCE:
        raise DataError(f"{name}: is a colour image; cdm models are single-channel (greyscale)")
    return np.rint(arr.mean(axis=-1)).astype(np.uint8)


def _pixels(img: Image.Image, name: str, background: tuple[int, int, int]) -> np.ndarray:
    """A 2-D uint8 array for grey images (grey stored as opaque colour included), else (H, W, 3) RGB with any
    transparency composited onto ``background``."""
    try:
        return _gray_array(img, name)
    except DataError as e:
        if "colour" not in str(e) and "transparent" not in str(e):
            raise
    rgba = img.convert("RGBA")
    canvas = Image.new("RGBA", rgba.size, (*background, 255))
    return np.asarray(Image.alpha_composite(canvas, rgba).convert("RGB"), dtype=np.uint8)


def _resize(arr: np.ndarray, height: int, width: int, resample) -> np.ndarray:
    if arr.shape[:2] == (height, width):
        return arr
    return np.asarray(Image.fromarray(arr).resize((width, height), resample), dtype=np.uint8)


def _to_spec(arr: np.ndarray, spec: ImageSpec, resample) -> np.ndarray:
    """One stored image (2-D grey or (H, W, 3)) as ``spec``: channels converted (grey -> RGB by repetition,
    RGB -> grey by ITU-R 601 luma, as PIL does), then resized."""
    if spec.channels == 3 and arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    elif spec.channels == 1 and arr.ndim == 3:
        arr = np.asarray(Image.fromarray(arr).convert("L"), dtype=np.uint8)
    return _resize(arr, spec.height, spec.width, resample)


def fit(source: Source, spec: ImageSpec, *, filter: str = "lanczos") -> Source:
    """``source`` with its images converted to ``spec`` (channels, then size, with ``filter``); the same
    source when it already matches. Its id says what was done (``<id>@32x32-rgb``)."""
    if source.spec == spec:
        return source
    if filter not in FILTERS:
        raise DataError(f"unknown resize filter {filter!r}; known: {', '.join(FILTERS)}")
    images = np.stack([_to_spec(img, spec, FILTERS[filter]) for img in source.images])
    tag = f"{spec.height}x{spec.width}-{'rgb' if spec.channels == 3 else 'grey'}"
    return Source(id=f"{source.id}@{tag}", images=images, labels=source.labels, classes=source.classes,
                  captions=source.captions)


def to_mnist_style(gray: np.ndarray, name: str, *, invert: bool | None = None) -> np.ndarray:
    """A square 2-D uint8 image as 28x28 white-on-black.

    ``invert=None`` inverts when the mean of the 1-pixel border exceeds 127 (black ink on white paper).
    Other sizes are resized with a Lanczos filter.
    """
    h, w = gray.shape
    if h != w:
        raise DataError(f"{name}: image is {w}x{h}, expected a square image")
    if h == 0:
        raise DataError(f"{name}: image is empty")
    if invert is None:
        border = np.concatenate([gray[0], gray[-1], gray[1:-1, 0], gray[1:-1, -1]])
        invert = float(border.mean()) > 127
    if invert:
        gray = 255 - gray
    if h != IMAGE_SIZE:
        resized = Image.fromarray(gray).resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS)
        gray = np.asarray(resized, dtype=np.uint8)
    return gray


def _read_image(path: Path, background: tuple[int, int, int]) -> np.ndarray:
    try:
        with Image.open(path) as img:
            img.load()
            return _pixels(img, str(path), background)
    except DataError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: not a readable PNG/JPEG image ({e})") from None


def _default_id(path: str | os.PathLike) -> str:
    return str(Path(path))


def load_folder(path: str | os.PathLike, *, id: str | None = None, invert: bool | None = None,
                spec: ImageSpec | None = None, background: tuple[int, int, int] = WHITE,
                filter: str = "lanczos") -> Source:
    """Images (.png/.jpg/.jpeg, any case) in a folder.

    With subfolders, each subfolder is a class (names sorted; labels in that order) holding its samples
    directly; with files only, the source is unlabelled. Names starting with "." are ignored; files are read
    in sorted name order. Without ``spec``: a folder of grey images (grey stored as opaque RGB/RGBA is fine)
    is read MNIST style, square images resized to 28x28 white-on-black (``invert``: None detects black ink on
    white by the border, True/False forces it); a folder with any colour or transparent image is RGB, with
    transparency composited onto ``background``, at the images' own size (they must all have it). With
    ``spec``: every image is converted to it (:func:`fit`'s rules, ``filter`` for resizing). The default ``id``
    is the path as given.
    """
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"{root}: not a folder" if root.exists() else f"{root}: no such folder")
    entries = sorted(p for p in root.iterdir() if not p.name.startswith("."))
    subdirs = [p for p in entries if p.is_dir()]
    top_images = [p for p in entries if _is_image_file(p)]
    files_by_class: list[list[Path]]
    if subdirs:
        if top_images:
            raise DataError(f"{root}: has both class subfolders and image files ({top_images[0].name}); use one layout")
        classes = tuple(p.name for p in subdirs)
        files_by_class = [sorted(p for p in d.iterdir() if _is_image_file(p)) for d in subdirs]
        for d, files in zip(subdirs, files_by_class, strict=True):
            if not files:
                raise DataError(f"{d}: class folder has no PNG/JPEG images")
    else:
        if not top_images:
            raise DataError(f"{root}: no PNG/JPEG images found")
        classes = ()
        files_by_class = [top_images]
    files = [f for fs in files_by_class for f in fs]
    pixels = [_read_image(f, background) for f in files]
    if spec is not None:
        if filter not in FILTERS:
            raise DataError(f"unknown resize filter {filter!r}; known: {', '.join(FILTERS)}")
        images = [_to_spec(a, spec, FILTERS[filter]) for a in pixels]
    elif all(a.ndim == 2 for a in pixels):  # grey: MNIST style, as the embedded digits
        images = [to_mnist_style(a, str(f), invert=invert) for a, f in zip(pixels, files, strict=True)]
    else:
        sizes = {a.shape[:2] for a in pixels}
        if len(sizes) > 1:
            (h0, w0), (h1, w1) = sorted(sizes)[:2]
            raise DataError(f"{root}: colour images of different sizes ({w0}x{h0} and {w1}x{h1}): give an image "
                            "spec to fit them to (`cdm add` fits them to the store's backbone)")
        images = [np.repeat(a[..., None], 3, axis=-1) if a.ndim == 2 else a for a in pixels]
    labels = None
    if classes:
        labels = np.concatenate([np.full(len(files), c, dtype=np.int64) for c, files in enumerate(files_by_class)])
    return Source(id=id or _default_id(path), images=np.stack(images), labels=labels, classes=classes)


def load_npz(path: str | os.PathLike, *, id: str | None = None) -> Source:
    """An .npz archive with ``images`` and optional ``labels``, ``classes`` and ``captions`` (read with
    allow_pickle=False).

    ``images``: uint8, (N, H, W) or (N, H, W, 1) grey, or (N, H, W, 3) RGB, any size, kept as stored (use
    :func:`fit` to resize). ``labels``: integers >= 0, length N. ``classes``: strings, one per label value
    (default "0", "1", ...). ``captions``: strings, one per image. Other keys are refused. The default ``id``
    is the path as given.
    """
    file = Path(path)
    if not file.is_file():
        raise DataError(f"{file}: no such file")
    if not zipfile.is_zipfile(file):
        raise DataError(f"{file}: not an .npz archive (not a zip file)")
    try:
        with np.load(file, allow_pickle=False) as archive:
            keys = set(archive.files)
            unknown = sorted(keys - set(_NPZ_KEYS) - set(_SPEC_KEYS))
            if unknown:
                raise DataError(f"{file}: unexpected keys {', '.join(unknown)} (expected images, labels, classes, "
                                "captions; optionally height, width, channels)")
            if "images" not in keys:
                raise DataError(f"{file}: no 'images' array")
            arrays = {key: archive[key] for key in (*_NPZ_KEYS, *_SPEC_KEYS) if key in keys}
    except DataError:
        raise
    except ValueError as e:
        if "pickle" in str(e).lower() or "object" in str(e).lower():
            raise DataError(f"{file}: holds an object array (pickled data), which cdm never loads") from None
        raise DataError(f"{file}: not a valid .npz archive ({e})") from None
    except (OSError, zipfile.BadZipFile, zlib.error, EOFError, KeyError) as e:
        raise DataError(f"{file}: not a valid .npz archive ({e})") from None
    images = _npz_images(arrays["images"], file)
    stated = {k: arrays[k] for k in _SPEC_KEYS if k in arrays}
    if stated:
        try:
            spec = ImageSpec(**{k: int(v) for k, v in stated.items()})
        except (TypeError, ValueError) as e:
            raise DataError(f"{file}: bad image spec ({e})") from None
        spec.check(images, str(file))
    labels, classes = _npz_labels(arrays.get("labels"), arrays.get("classes"), len(images), file)
    captions = arrays.get("captions")
    if captions is not None and (captions.dtype.kind != "U" or captions.ndim != 1):
        raise DataError(f"{file}: captions must be a 1-D array of strings")
    return Source(id=id or _default_id(path), images=images, labels=labels, classes=classes,
                  captions=None if captions is None else tuple(str(c) for c in captions))


def _npz_images(images: np.ndarray, file: Path) -> np.ndarray:
    if images.dtype != np.uint8:
        raise DataError(f"{file}: images have dtype {images.dtype}, expected uint8 (0..255)")
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] != 3):
        raise DataError(f"{file}: images have shape {images.shape}, expected (N, H, W) grey or (N, H, W, 3) RGB")
    if images.shape[0] == 0:
        raise DataError(f"{file}: holds no images")
    if 0 in images.shape[1:3]:
        raise DataError(f"{file}: images are empty ({images.shape[2]}x{images.shape[1]})")
    return np.ascontiguousarray(images)


def _npz_labels(
    labels: np.ndarray | None, classes: np.ndarray | None, n: int, file: Path
) -> tuple[np.ndarray | None, tuple[str, ...]]:
    if labels is None:
        if classes is not None:
            raise DataError(f"{file}: has 'classes' but no 'labels'")
        return None, ()
    if labels.dtype.kind not in "iu":
        raise DataError(f"{file}: labels have dtype {labels.dtype}, expected integers")
    if labels.shape != (n,):
        raise DataError(f"{file}: labels have shape {labels.shape}, expected ({n},) to match {n} images")
    if labels.min() < 0:
        raise DataError(f"{file}: labels must be non-negative")
    if classes is None:
        return labels.astype(np.int64), tuple(str(c) for c in range(int(labels.max()) + 1))
    if classes.dtype.kind != "U" or classes.ndim != 1:
        raise DataError(f"{file}: classes must be a 1-D array of strings")
    names = tuple(str(c) for c in classes)
    if labels.max() >= len(names):
        raise DataError(f"{file}: label {int(labels.max())} has no class name ({len(names)} classes)")
    if len(set(names)) != len(names) or not all(names):
        raise DataError(f"{file}: class names must be distinct and non-empty")
    return labels.astype(np.int64), names
