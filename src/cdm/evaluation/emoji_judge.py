"""The emoji judge: one :class:`ImageClassifier` that reads an emoji's Unicode category and which of the five
artists drew it, trained on held-out halves of all five artists; its penultimate features are the FID features
of the emoji benchmark, its artist head the ground truth for "whose style is this sample".

Each artist's 1,081 shipped emoji are split in two stratified halves (``emoji:ARTIST/strat2-0`` and ``-1``, by
category): half 0 is what compartments train on; half 1 trains the judge. The judge's accuracy is measured on
half 0, real images it never saw.

The **subcategory judge** (``shipped:judge-emoji-subcategory``, :func:`load_subcategory_judge`) is the same
network and recipe with the 94 Unicode subcategories (:data:`SUBCATEGORIES`, e.g. ``face-smiling``,
``food-fruit``) as its classes and the same artist head: it reads whether a generated emoji shows its caption's
subcategory (:func:`subcategory_of`, :func:`subcategory_probs`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..data import EMOJI_ARTISTS, EMOJI_CATEGORIES, load_source
from ..data.emoji import emoji_metadata
from ..data.source import Source
from ..errors import DataError
from .classifier import ClassifierConfig, ImageClassifier, _down_up_tensor, train_classifier
from .metrics import class_probs, classify, source_probs

__all__ = ["ARTIST_ORDER", "JUDGE_HALF", "SUBCATEGORIES", "SUBCATEGORY_CATEGORY", "SUBCATEGORY_JUDGE", "TRAIN_HALF",
           "artist_half", "emoji_judge_config", "evaluate_judge", "evaluate_subcategory_judge",
           "half_subcategories", "judge_data", "load_subcategory_judge", "subcategory_judge_config",
           "subcategory_judge_data", "subcategory_of", "subcategory_probs", "train_emoji_judge",
           "train_subcategory_judge"]

ARTIST_ORDER = tuple(EMOJI_ARTISTS)  # the source head's classes, in this order
TRAIN_HALF = 0  # emoji:ARTIST/strat2-0: what compartments (and the benchmark's memorization check) train on
JUDGE_HALF = 1  # emoji:ARTIST/strat2-1: what the judge trains on


def artist_half(artist: str, half: int) -> Source:
    """Half ``half`` (0 or 1) of an artist's shipped emoji, stratified by category."""
    return load_source(f"emoji:{artist}/strat2-{half}")


def judge_data(half: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(images, categories, artists)`` of half ``half`` of all five artists (artists index ARTIST_ORDER)."""
    parts = [artist_half(a, half) for a in ARTIST_ORDER]
    images = np.concatenate([p.images for p in parts])
    cats = np.concatenate([p.labels for p in parts])
    artists = np.concatenate([np.full(len(p), i) for i, p in enumerate(parts)])
    return images, cats, artists


def emoji_judge_config() -> ClassifierConfig:
    """32x32 RGB in, 10 categories and 5 artists out; three conv stages (32 -> 16 -> 8 -> 4)."""
    return ClassifierConfig(num_classes=len(EMOJI_CATEGORIES), widths=(32, 64, 128), feature_dim=128,
                            image_size=32, channels=3, num_sources=len(ARTIST_ORDER))


def evaluate_judge(model: ImageClassifier, images: Any, categories: np.ndarray, artists: np.ndarray) -> dict:
    """Category and artist accuracy on real images, plain and through the half-resolution down-up blur (what a
    16x16 model upsampled looks like); per-artist accuracy too."""
    out: dict = {"n": int(len(images))}
    blurred = _down_up(model, images)
    for tag, imgs in (("", images), ("down_up_", blurred)):
        pred, _, _ = classify(model, imgs)
        who = source_probs(model, imgs).argmax(1)
        out[f"{tag}category_acc"] = round(float(np.mean(pred == categories)), 4)
        out[f"{tag}artist_acc"] = round(float(np.mean(who == artists)), 4)
        if not tag:
            out["artist_acc_by_artist"] = {a: round(float(np.mean(who[artists == i] == i)), 4)
                                           for i, a in enumerate(ARTIST_ORDER)}
    return out


def _down_up(model: ImageClassifier, images: Any) -> np.ndarray:
    x = (model.to_input(images) + 1.0) * 127.5
    y = _down_up_tensor(x).round().clamp_(0, 255).to(torch.uint8)
    return y.permute(0, 2, 3, 1).numpy() if y.shape[1] == 3 else y[:, 0].numpy()


def train_emoji_judge(*, steps: int = 3000, seed: int = 0, progress: bool = True) -> tuple[ImageClassifier, dict]:
    """Train the judge on the judge halves; the record's ``held_out`` is :func:`evaluate_judge` on the other
    halves (never seen in training)."""
    images, cats, artists = judge_data(JUDGE_HALF)
    model, record = train_classifier(images, cats, sources=artists, config=emoji_judge_config(), steps=steps,
                                     seed=seed, progress=progress, background=1.0, down_up_prob=0.3)
    held = judge_data(TRAIN_HALF)
    record.update(artists=list(ARTIST_ORDER), categories=list(EMOJI_CATEGORIES),
                  data={"train": [f"emoji:{a}/strat2-{JUDGE_HALF}" for a in ARTIST_ORDER],
                        "held_out": [f"emoji:{a}/strat2-{TRAIN_HALF}" for a in ARTIST_ORDER]},
                  held_out=evaluate_judge(model, *held))
    return model, record


# ----------------------------------------------------------------------------------------------------------------
# the subcategory judge

# The Unicode subcategories of the shipped subjects, per category; within a category in order of first appearance
# in the shipped metadata (emoji-datasource's sort order), the categories in EMOJI_CATEGORIES order ("Component"
# has no shipped subject). Flattened, this is also the order of first appearance over all subjects. The order is
# that of the subcategory judge's classes: never reorder it without retraining the shipped weights.
_SUBCATEGORIES_BY_CATEGORY: dict[str, tuple[str, ...]] = {
    "Smileys & Emotion": ("face-smiling", "face-affection", "face-tongue", "face-hand", "face-neutral-skeptical",
                          "face-sleepy", "face-unwell", "face-hat", "face-glasses", "face-concerned",
                          "face-negative", "face-costume", "cat-face", "monkey-face", "heart", "emotion"),
    "People & Body": ("hand-fingers-open", "hand-fingers-partial", "hand-single-finger", "hand-fingers-closed",
                      "hands", "hand-prop", "body-parts", "person", "person-gesture", "person-role",
                      "person-fantasy", "person-activity", "person-sport", "person-resting", "person-symbol"),
    "Component": (),
    "Animals & Nature": ("animal-mammal", "animal-bird", "animal-amphibian", "animal-reptile", "animal-marine",
                         "animal-bug", "plant-flower", "plant-other"),
    "Food & Drink": ("food-fruit", "food-vegetable", "food-prepared", "food-asian", "food-sweet", "drink",
                     "dishware"),
    "Travel & Places": ("place-map", "place-geographic", "place-building", "place-religious", "place-other",
                        "transport-ground", "transport-water", "transport-air", "hotel", "time", "sky & weather"),
    "Activities": ("event", "award-medal", "sport", "game", "arts & crafts"),
    "Objects": ("clothing", "sound", "music", "musical-instrument", "phone", "computer", "light & video",
                "book-paper", "money", "mail", "writing", "office", "lock", "tool", "science", "medical",
                "household", "other-object"),
    "Symbols": ("transport-sign", "warning", "arrow", "religion", "zodiac", "av-symbol", "math", "punctuation",
                "currency", "other-symbol", "keycap", "alphanum", "geometric"),
    "Flags": ("flag",),
}
SUBCATEGORIES: tuple[str, ...] = tuple(s for c in EMOJI_CATEGORIES for s in _SUBCATEGORIES_BY_CATEGORY[c])
"""The 94 subcategories: the subcategory judge's classes, in this order (first appearance in the metadata)."""
SUBCATEGORY_CATEGORY: tuple[int, ...] = tuple(k for k, c in enumerate(EMOJI_CATEGORIES)
                                              for _ in _SUBCATEGORIES_BY_CATEGORY[c])
"""``SUBCATEGORY_CATEGORY[i]``: the index in EMOJI_CATEGORIES of the category that subcategory ``i`` belongs to."""
SUBCATEGORY_JUDGE = "shipped:judge-emoji-subcategory"  # the shipped bundle (src/cdm/weights/judge-emoji-subcategory)
_SUB_INDEX = {s: i for i, s in enumerate(SUBCATEGORIES)}


def half_subcategories(artist: str, half: int) -> np.ndarray:
    """The subcategory index (into :data:`SUBCATEGORIES`) of each image of :func:`artist_half` ``(artist, half)``,
    in that source's order.

    A split keeps its base's order but not its row numbers, so rows are matched to the shipped metadata of
    ``emoji:ARTIST`` by content: (sample hash, category). Rows of equal content (an artist may draw two subjects
    alike) must agree on the subcategory, which is then exact whichever twin the split dealt where; a
    disagreement raises :class:`DataError`.
    """
    full = load_source(f"emoji:{artist}")
    meta = emoji_metadata(artist)
    if len(meta["subcategories"]) != len(full):
        raise DataError(f"emoji:{artist}: metadata ({len(meta['subcategories'])} rows) does not match the images")
    by_key: dict[tuple[str, int], int] = {}
    for h, label, sub in zip(full.sample_hashes, full.labels.tolist(), meta["subcategories"].tolist(), strict=True):
        if sub not in _SUB_INDEX:
            raise DataError(f"emoji:{artist}: subcategory {sub!r} is not in SUBCATEGORIES")
        k = _SUB_INDEX[sub]
        if by_key.setdefault((h, label), k) != k:
            raise DataError(f"emoji:{artist}: identical images of one category carry subcategories "
                            f"{SUBCATEGORIES[by_key[(h, label)]]!r} and {sub!r}; a split cannot tell them apart")
    part = artist_half(artist, half)
    try:
        return np.array([by_key[(h, label)] for h, label in zip(part.sample_hashes, part.labels.tolist(),
                                                                 strict=True)], dtype=np.int64)
    except KeyError:
        raise DataError(f"{part.id}: an image is not among the shipped emoji of {artist}") from None


def subcategory_judge_data(half: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(images, subcategories, artists)`` of half ``half`` of all five artists, in :func:`judge_data`'s order
    (subcategories index SUBCATEGORIES, artists ARTIST_ORDER)."""
    parts = [artist_half(a, half) for a in ARTIST_ORDER]
    images = np.concatenate([p.images for p in parts])
    subs = np.concatenate([half_subcategories(a, half) for a in ARTIST_ORDER])
    artists = np.concatenate([np.full(len(p), i) for i, p in enumerate(parts)])
    return images, subs, artists


def subcategory_judge_config() -> ClassifierConfig:
    """:func:`emoji_judge_config` with the 94 subcategories as classes (and the same 5-artist head)."""
    return ClassifierConfig(num_classes=len(SUBCATEGORIES), widths=(32, 64, 128), feature_dim=128,
                            image_size=32, channels=3, num_sources=len(ARTIST_ORDER))


def load_subcategory_judge(ref: str = SUBCATEGORY_JUDGE) -> ImageClassifier:
    """The subcategory judge (default: the shipped one), in eval mode; refuses a classifier of other classes."""
    model = ImageClassifier.from_pretrained(ref)
    cfg = model.config
    if (cfg.image_size, cfg.channels, cfg.num_classes) != (32, 3, len(SUBCATEGORIES)):
        raise DataError(f"{ref}: not an emoji subcategory judge (32x32 RGB, {len(SUBCATEGORIES)} classes; "
                        f"{SUBCATEGORY_JUDGE})")
    return model


def subcategory_probs(model: ImageClassifier, images: Any, batch_size: int = 500) -> np.ndarray:
    """Softmax over SUBCATEGORIES ``(N, 94)`` float32 for uint8 ``(N, 32, 32, 3)`` images (eval mode, restored)."""
    return class_probs(model, images, batch_size)


def subcategory_of(model: ImageClassifier, images: Any) -> np.ndarray:
    """The predicted subcategory index (into SUBCATEGORIES) of each uint8 ``(N, 32, 32, 3)`` image, int64.
    ``np.asarray(SUBCATEGORY_CATEGORY)[subcategory_of(...)]`` is the category it implies."""
    return subcategory_probs(model, images).argmax(1).astype(np.int64)


def evaluate_subcategory_judge(model: ImageClassifier, images: Any, subcategories: np.ndarray,
                               artists: np.ndarray) -> dict:
    """Subcategory accuracy (top-1, top-5), the accuracy of the category the top-1 subcategory implies, artist
    accuracy, each plain and through the down-up blur; per-artist top-1; and two chance levels: uniform
    (1/94) and always answering the subcategory most frequent among these images."""
    subcategories, artists = np.asarray(subcategories), np.asarray(artists)
    to_cat = np.asarray(SUBCATEGORY_CATEGORY)
    out: dict = {"n": int(len(images))}
    for tag, imgs in (("", images), ("down_up_", _down_up(model, images))):
        probs = subcategory_probs(model, imgs)
        pred = probs.argmax(1)
        top5 = np.argsort(-probs, axis=1)[:, :5]
        who = source_probs(model, imgs).argmax(1)
        out[f"{tag}subcategory_acc"] = round(float(np.mean(pred == subcategories)), 4)
        out[f"{tag}subcategory_top5_acc"] = round(float(np.mean((top5 == subcategories[:, None]).any(1))), 4)
        out[f"{tag}category_acc"] = round(float(np.mean(to_cat[pred] == to_cat[subcategories])), 4)
        out[f"{tag}artist_acc"] = round(float(np.mean(who == artists)), 4)
        if not tag:
            out["subcategory_acc_by_artist"] = {a: round(float(np.mean(pred[artists == i] == subcategories[
                artists == i])), 4) for i, a in enumerate(ARTIST_ORDER)}
    out["chance_uniform"] = round(1 / len(SUBCATEGORIES), 4)
    out["chance_majority"] = round(float(np.bincount(subcategories).max() / max(1, len(subcategories))), 4)
    return out


def train_subcategory_judge(*, steps: int = 2500, seed: int = 0, progress: bool = True
                            ) -> tuple[ImageClassifier, dict]:
    """Train the subcategory judge on the judge halves with :func:`train_emoji_judge`'s recipe; the record's
    ``held_out`` is :func:`evaluate_subcategory_judge` on the other halves (never seen in training)."""
    images, subs, artists = subcategory_judge_data(JUDGE_HALF)
    model, record = train_classifier(images, subs, sources=artists, config=subcategory_judge_config(), steps=steps,
                                     seed=seed, progress=progress, background=1.0, down_up_prob=0.3)
    record.update(artists=list(ARTIST_ORDER), subcategories=list(SUBCATEGORIES),
                  subcategory_category=list(SUBCATEGORY_CATEGORY), categories=list(EMOJI_CATEGORIES),
                  data={"train": [f"emoji:{a}/strat2-{JUDGE_HALF}" for a in ARTIST_ORDER],
                        "held_out": [f"emoji:{a}/strat2-{TRAIN_HALF}" for a in ARTIST_ORDER],
                        "labels": "emoji_metadata(artist)['subcategories'], rows matched by (sample hash, category)"},
                  held_out=evaluate_subcategory_judge(model, *subcategory_judge_data(TRAIN_HALF)))
    return model, record
