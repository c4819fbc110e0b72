"""Judging generated images: a small classifier (class and, optionally, source heads), its accuracy/confidence on
samples, and FID on its features."""

from __future__ import annotations

from .classifier import (
    CLASSIFIER_KIND,
    TRAINING_RECORD_NAME,
    ClassifierConfig,
    DigitClassifier,
    ImageClassifier,
    check_images,
    down_up,
    to_input,
    train_classifier,
)
from .metrics import FeatureExtractor, FIDScorer, class_probs, classify, fid, judge, score_samples, source_probs

__all__ = [
    "CLASSIFIER_KIND",
    "TRAINING_RECORD_NAME",
    "ClassifierConfig",
    "DigitClassifier",
    "ImageClassifier",
    "FIDScorer",
    "FeatureExtractor",
    "check_images",
    "class_probs",
    "classify",
    "down_up",
    "fid",
    "judge",
    "score_samples",
    "source_probs",
    "to_input",
    "train_classifier",
]
