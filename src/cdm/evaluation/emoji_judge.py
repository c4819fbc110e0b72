"""The emoji judge: one :class:`ImageClassifier` that reads an emoji's Unicode category and which of the five
artists drew it, trained on held-out halves of all five artists; its penultimate features are the FID features
of the emoji benchmark, its artist head the ground truth for "whose style is this sample".

Each artist's 1,081 shipped emoji are split in two stratified halves (``emoji:ARTIST/strat2-0`` and ``-1``, by
category): half 0 is what compartments train on; half 1 trains the judge. The judge's accuracy is measured on
half 0, real images it never saw.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..data import EMOJI_ARTISTS, EMOJI_CATEGORIES, load_source
from ..data.source import Source
from .classifier import ClassifierConfig, ImageClassifier, _down_up_tensor, train_classifier
from .metrics import classify, source_probs

__all__ = ["ARTIST_ORDER", "JUDGE_HALF", "TRAIN_HALF", "artist_half", "emoji_judge_config", "evaluate_judge",
           "judge_data", "train_emoji_judge"]

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
