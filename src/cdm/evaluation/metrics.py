"""Scores for generated images, computed with an :class:`~cdm.evaluation.classifier.ImageClassifier`.

* :func:`classify` / :func:`judge`: does a sample look like the class it was asked for, and how sure is the
  classifier? :func:`source_probs`: which source (artist) the source head reads in each sample.
* :func:`fid`: a Fréchet distance between the classifier's penultimate features of two image sets, through
  torchmetrics' ``FrechetInceptionDistance`` with :class:`FeatureExtractor` in place of Inception (nothing is
  downloaded). The numbers are in this classifier's feature units: comparable between runs scored with the same
  classifier checkpoint, not with Inception FIDs from the literature.
* :func:`score_samples`: both at once for a sample set, against a reference source (what the CLI's ``score``,
  the demo and the benchmarks report).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import DataError
from .classifier import ImageClassifier

__all__ = ["FIDScorer", "FeatureExtractor", "class_probs", "classify", "fid", "judge", "score_samples", "source_probs"]


def _batches(n: int, batch_size: int):
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    for start in range(0, n, batch_size):
        yield slice(start, min(n, start + batch_size))


@torch.no_grad()
def classify(model: ImageClassifier, images_uint8: Any, batch_size: int = 500
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Run the classifier on uint8 images of its size and channels (``(N, 28, 28)`` for the digit judge).

    Returns ``(pred (N,) int64, max_prob (N,) float32, features (N, feature_dim) float32)``. The model is run in
    eval mode without gradients; its train/eval mode is restored afterwards.
    """
    images = model.check(images_uint8)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    preds, probs, feats = [], [], []
    try:
        for sl in _batches(images.shape[0], batch_size):
            x = model.to_input(images[sl]).to(device)
            f = model.features(x)
            p = torch.softmax(model.head(f).float(), dim=1)
            top, arg = p.max(dim=1)
            preds.append(arg.cpu())
            probs.append(top.cpu())
            feats.append(f.float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(preds).numpy().astype(np.int64), torch.cat(probs).numpy(), torch.cat(feats).numpy()


def source_probs(model: ImageClassifier, images_uint8: Any, batch_size: int = 500) -> np.ndarray:
    """The source head's probabilities ``(N, num_sources)`` for uint8 images (e.g. which artist drew each)."""
    return _head_probs(model, images_uint8, model.source_logits, batch_size)


def class_probs(model: ImageClassifier, images_uint8: Any, batch_size: int = 500) -> np.ndarray:
    """The class head's probabilities ``(N, num_classes)`` for uint8 images."""
    return _head_probs(model, images_uint8, model.head, batch_size)


@torch.no_grad()
def _head_probs(model: ImageClassifier, images_uint8: Any, head, batch_size: int) -> np.ndarray:
    images = model.check(images_uint8)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    try:
        for sl in _batches(images.shape[0], batch_size):
            f = model.features(model.to_input(images[sl]).to(device))
            out.append(torch.softmax(head(f).float(), dim=1).cpu())
    finally:
        model.train(was_training)
    return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)


def judge(model: ImageClassifier, images: Any, requested_labels: Any, batch_size: int = 500) -> dict[str, float | int]:
    """How often the classifier sees the requested class, and its mean confidence (max softmax probability).

    Returns ``{"accuracy": float, "mean_max_prob": float, "n": int}``.
    """
    images = model.check(images)
    labels = np.asarray(requested_labels)
    if labels.shape != (images.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"requested_labels: expected {images.shape[0]} integers, got shape {labels.shape} "
                        f"dtype {labels.dtype}")
    pred, prob, _ = classify(model, images, batch_size=batch_size)
    return {"accuracy": float((pred == labels).mean()), "mean_max_prob": float(prob.mean()), "n": len(labels)}


class FeatureExtractor(nn.Module):
    """The classifier's penultimate features, shaped for torchmetrics' ``FrechetInceptionDistance(feature=...)``.

    Input: **uint8** images ``(N, C, H, W)`` of the classifier's size and channels (``(N, 1, 28, 28)`` for the
    digit judge; ``(N, H, W)`` also works for grey), pixels 0..255: the dtype torchmetrics' FID expects with its
    default ``normalize=False``. Other dtypes or shapes raise :class:`DataError`.
    Output: float64 ``(N, feature_dim)``. Returning float64 matters: torchmetrics accumulates the statistics in
    float64 either way, but casts the final FID back to the dtype of the features it was given.

    ``num_features`` is set, so torchmetrics does not probe the module with a dummy 3x299x299 image. The wrapped
    classifier always runs in eval mode (``train()`` is a no-op) and without gradients.
    """

    def __init__(self, model: ImageClassifier) -> None:
        super().__init__()
        self.model = model
        self.num_features = int(model.feature_dim)
        self.train(False)

    def train(self, mode: bool = True) -> FeatureExtractor:
        return super().train(False)

    @torch.no_grad()
    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        if not isinstance(imgs, torch.Tensor) or imgs.dtype != torch.uint8:
            raise DataError(f"FeatureExtractor: expected a uint8 tensor, got {getattr(imgs, 'dtype', type(imgs))}")
        if imgs.ndim == 3:
            imgs = imgs.unsqueeze(1)
        c, size = self.model.config.channels, self.model.config.image_size
        if imgs.ndim != 4 or imgs.shape[1:] != (c, size, size):
            raise DataError(f"FeatureExtractor: expected shape (N, {c}, {size}, {size}), got {tuple(imgs.shape)}")
        device = next(self.model.parameters()).device
        x = imgs.to(device=device, dtype=torch.float32) / 127.5 - 1.0
        return self.model.features(x).double()


def _as_uint8_tensor(model: ImageClassifier, images: Any, what: str) -> torch.Tensor:
    """uint8 ``(N, C, H, W)`` for torchmetrics from images as the data layer keeps them."""
    x = torch.tensor(np.asarray(model.check(images, what)))
    return x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2).contiguous()


class FIDScorer:
    """FID against a fixed reference set whose features are computed once.

    >>> scorer = FIDScorer(model, reference_uint8)   # doctest: +SKIP
    >>> scorer(samples_a), scorer(samples_b)          # doctest: +SKIP

    The underlying metric is built with ``reset_real_features=False``, so :meth:`__call__` resets only the
    sample-side statistics between calls.
    """

    def __init__(self, model: ImageClassifier, reference_uint8: Any, batch_size: int = 500) -> None:
        from torchmetrics.image.fid import FrechetInceptionDistance

        self.model = model
        reference = _as_uint8_tensor(model, reference_uint8, "reference images")
        if reference.shape[0] < 2:
            raise DataError("reference images: FID needs at least 2 images")
        self.batch_size = batch_size
        self.n_reference = int(reference.shape[0])
        self.metric = FrechetInceptionDistance(feature=FeatureExtractor(model), reset_real_features=False,
                                               normalize=False)
        for sl in _batches(reference.shape[0], batch_size):
            self.metric.update(reference[sl], real=True)

    def __call__(self, samples_uint8: Any) -> float:
        samples = _as_uint8_tensor(self.model, samples_uint8, "samples")
        if samples.shape[0] < 2:
            raise DataError("samples: FID needs at least 2 images")
        self.metric.reset()  # keeps the reference statistics
        for sl in _batches(samples.shape[0], self.batch_size):
            self.metric.update(samples[sl], real=False)
        return float(self.metric.compute())


def fid(model: ImageClassifier, samples_uint8: Any, reference_uint8: Any, batch_size: int = 500) -> float:
    """Fréchet distance between the classifier features of uint8 ``samples`` and ``reference`` images.

    Both sets need at least 2 images; with fewer images than ``feature_dim`` the covariances are rank-deficient
    and the value is dominated by small-sample bias (it shrinks as N grows), so compare FIDs only at equal N.
    """
    return FIDScorer(model, reference_uint8, batch_size=batch_size)(samples_uint8)


def score_samples(images: np.ndarray, labels: np.ndarray | None, classifier: ImageClassifier, reference) -> dict:
    """Judge accuracy / confidence against requested labels and FID against a reference source."""
    result = {"n": int(len(images)), "reference": reference.id,
              "fid": round(fid(classifier, images, reference.images), 3)}
    if labels is not None:
        j = judge(classifier, images, labels)
        result.update(accuracy=round(j["accuracy"], 4), mean_max_prob=round(j["mean_max_prob"], 4))
        if reference.labels is not None:
            real = judge(classifier, reference.images, reference.labels)
            result.update(real_mean_max_prob=round(real["mean_max_prob"], 4),
                          confidence_ratio=round(j["mean_max_prob"] / real["mean_max_prob"], 4))
    return result
