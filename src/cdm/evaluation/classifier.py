"""A small CNN that judges generated images and is the feature network for FID: the shipped digit judge
(28x28 grey, 10 classes) and the emoji judge (32x32 RGB, 10 categories plus a second head, the artist).

Images on the way in are uint8 arrays ``(N, H, W)`` (grey; the digits are white on black, MNIST style) or
``(N, H, W, 3)`` (RGB); the network itself sees float tensors ``(N, C, H, W)`` scaled to ``[-1, 1]``
(:meth:`ImageClassifier.to_input`, or :func:`to_input` for the 28x28 grey default).

A classifier has a class head (``num_classes``) and, when ``num_sources > 0``, a source head: which data source
an image comes from (for emoji, which artist drew it), the ground truth for "whose style is this sample".

The generators this classifier judges may work at half the data's resolution and upsample bilinearly, so training
augments with a "down-up" blur (:func:`down_up`) some of the time, next to a small random affine warp.

Weights are stored as a directory: ``config.json`` (with ``"kind": "image-classifier"``; the older
``"digit-classifier"`` is read too), ``model.safetensors`` and, optionally, ``training.json`` (the record
:func:`train_classifier` returns).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DataError, TrainingError, WeightsError
from ..shipped import path_of
from ..io import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    atomic_write_json,
    config_from_dict,
    load_state_dict,
    load_strict,
    read_json,
    save_state_dict,
)

__all__ = [
    "CLASSIFIER_KIND",
    "TRAINING_RECORD_NAME",
    "ClassifierConfig",
    "DigitClassifier",
    "ImageClassifier",
    "check_images",
    "down_up",
    "to_input",
    "train_classifier",
]

CLASSIFIER_KIND = "image-classifier"
_KINDS = (CLASSIFIER_KIND, "digit-classifier")  # what from_pretrained reads (the second: before colour judges)
TRAINING_RECORD_NAME = "training.json"
IMAGE_SIZE = 28


# ----------------------------------------------------------------------------------------------------------------
# images


def check_images(images: Any, what: str = "images", *, size: int = IMAGE_SIZE, channels: int = 1) -> np.ndarray:
    """Return ``images`` as a uint8 array ``(N, size, size)`` (grey) or ``(N, size, size, 3)`` (RGB, channels
    last as the data layer keeps them); channels-first ``(N, C, size, size)`` is accepted and reordered.

    Anything else (another dtype, another size or channel count, an empty set) raises :class:`DataError`.
    """
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise DataError(f"{what}: expected uint8 pixels (0..255), got dtype {images.dtype}")
    if images.ndim == 4 and images.shape[1] == channels and images.shape[2:] == (size, size) and \
            images.shape[3] != channels:
        images = images[:, 0] if channels == 1 else np.ascontiguousarray(images.transpose(0, 2, 3, 1))
    want = (size, size) if channels == 1 else (size, size, channels)
    if images.shape[1:] != want:
        raise DataError(f"{what}: expected shape (N, {', '.join(map(str, want))}), got {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise DataError(f"{what}: no images")
    return images


def to_input(images: Any, *, size: int = IMAGE_SIZE, channels: int = 1) -> torch.Tensor:
    """uint8 images (see :func:`check_images`) -> float32 tensor ``(N, C, size, size)`` in ``[-1, 1]``."""
    x = torch.tensor(check_images(images, size=size, channels=channels)).to(torch.float32)
    x = x.unsqueeze(1) if channels == 1 else x.permute(0, 3, 1, 2).contiguous()
    return x / 127.5 - 1.0


def _down_up_tensor(x: torch.Tensor) -> torch.Tensor:
    """Average-pool 28x28 -> 14x14, then bilinearly upsample back (``align_corners=False``), as the generators do."""
    small = F.avg_pool2d(x, kernel_size=2)
    return F.interpolate(small, size=x.shape[-2:], mode="bilinear", align_corners=False)


def down_up(images: Any) -> np.ndarray:
    """The "down-up" version of uint8 28x28 grey images: what a 14x14 generator upsampled to 28x28 looks like."""
    x = torch.tensor(np.asarray(check_images(images))).to(torch.float32).unsqueeze(1)
    y = _down_up_tensor(x).round().clamp_(0, 255).to(torch.uint8)
    return y[:, 0].numpy()


# ----------------------------------------------------------------------------------------------------------------
# the network


@dataclass
class ClassifierConfig:
    num_classes: int = 10  # number of classes (logits of the class head)
    widths: tuple[int, ...] = (32, 64)  # channels of each stage; a stage is two 3x3 convs + 2x2 max-pool (28->14->7)
    feature_dim: int = 128  # size of the penultimate vector: what features() returns and FID is computed on
    dropout: float = 0.2  # dropout on the features before the last linear layer (training only)
    norm: str = "batch"  # normalisation after each conv: "batch" (BatchNorm2d) or "group" (GroupNorm, 8 groups)
    image_size: int = IMAGE_SIZE  # side of the (square) images it judges
    channels: int = 1  # 1 grey, 3 RGB
    num_sources: int = 0  # logits of the source head (which source / artist an image is from); 0: no such head

    def __post_init__(self) -> None:
        self.widths = tuple(int(w) for w in self.widths)
        problems = []
        if self.num_classes < 2:
            problems.append("num_classes must be >= 2")
        if not self.widths or any(w < 1 for w in self.widths):
            problems.append("widths must be a non-empty list of positive ints")
        if self.image_size < 4 or self.image_size >> len(self.widths) < 1:
            problems.append(f"image_size must be >= 4 with at most log2(image_size) stages, got {self.image_size} "
                            f"and {len(self.widths)}")
        if self.channels not in (1, 3):
            problems.append("channels must be 1 or 3")
        if self.num_sources < 0 or self.num_sources == 1:
            problems.append("num_sources must be 0 (no source head) or >= 2")
        if self.feature_dim < 1:
            problems.append("feature_dim must be >= 1")
        if not 0.0 <= self.dropout < 1.0:
            problems.append("dropout must be in [0, 1)")
        if self.norm not in ("batch", "group"):
            problems.append('norm must be "batch" or "group"')
        if self.norm == "group" and any(w % 8 for w in self.widths):
            problems.append('norm="group" needs widths divisible by 8')
        if problems:
            raise ValueError("ClassifierConfig: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["widths"] = list(self.widths)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ClassifierConfig:
        return config_from_dict(cls, d, "classifier", ignore=("kind",))


def _norm(kind: str, channels: int) -> nn.Module:
    return nn.BatchNorm2d(channels) if kind == "batch" else nn.GroupNorm(8, channels)


class ImageClassifier(nn.Module):
    """conv-conv-pool stages, then ``Linear -> GELU`` (the features), dropout and ``Linear`` (the class logits);
    with ``num_sources`` a second ``Linear`` on the same features gives the source logits."""

    def __init__(self, config: ClassifierConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or ClassifierConfig()
        layers: list[nn.Module] = []
        c_in = config.channels
        for w in config.widths:
            for _ in range(2):
                layers += [nn.Conv2d(c_in, w, 3, padding=1, bias=False), _norm(config.norm, w), nn.GELU()]
                c_in = w
            layers.append(nn.MaxPool2d(2))
        self.body = nn.Sequential(*layers)
        side = config.image_size >> len(config.widths)
        self.to_features = nn.Sequential(nn.Flatten(), nn.Linear(c_in * side * side, config.feature_dim), nn.GELU())
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.feature_dim, config.num_classes)
        self.source_head = nn.Linear(config.feature_dim, config.num_sources) if config.num_sources else None

    @property
    def feature_dim(self) -> int:
        return self.config.feature_dim

    def check(self, images: Any, what: str = "images") -> np.ndarray:
        """uint8 images of this classifier's size and channels (see :func:`check_images`)."""
        return check_images(images, what, size=self.config.image_size, channels=self.config.channels)

    def to_input(self, images: Any) -> torch.Tensor:
        """uint8 images -> the float ``(N, C, H, W)`` in ``[-1, 1]`` the network takes."""
        return to_input(images, size=self.config.image_size, channels=self.config.channels)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """float ``(N, C, H, W)`` in ``[-1, 1]`` -> penultimate features ``(N, feature_dim)``."""
        return self.to_features(self.body(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """float ``(N, C, H, W)`` in ``[-1, 1]`` -> class logits ``(N, num_classes)``."""
        return self.head(self.dropout(self.features(x)))

    def source_logits(self, features: torch.Tensor) -> torch.Tensor:
        """Penultimate features -> source logits ``(N, num_sources)``; refused without a source head."""
        if self.source_head is None:
            raise DataError("this classifier has no source head (num_sources = 0)")
        return self.source_head(self.dropout(features))

    # -- weights on disk --------------------------------------------------------------------------------------

    def save_pretrained(self, directory: str | os.PathLike, record: dict | None = None) -> Path:
        """Write ``config.json``, ``model.safetensors`` and (if ``record`` is given) ``training.json``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v for k, v in self.state_dict().items()}
        save_state_dict(directory / WEIGHTS_NAME, state, metadata={"kind": CLASSIFIER_KIND})
        atomic_write_json(directory / CONFIG_NAME, {"kind": CLASSIFIER_KIND, **self.config.to_dict()})
        if record is not None:
            atomic_write_json(directory / TRAINING_RECORD_NAME, record)
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> ImageClassifier:
        """Load a directory written by :meth:`save_pretrained`; the result is in eval mode.

        A missing or foreign config, a pickle, or weights that do not match the config raise :class:`WeightsError`.
        ``shipped:classifier`` names the shipped one.
        """
        directory = path_of(directory)
        if directory.is_file():
            load_state_dict(directory)  # a pickle offered as weights gets io's own refusal
            raise WeightsError(f"{directory}: expected a classifier directory ({CONFIG_NAME} + {WEIGHTS_NAME}), "
                               "not a single file")
        if not directory.is_dir():
            raise WeightsError(f"{directory}: not a classifier directory (expected {CONFIG_NAME} + {WEIGHTS_NAME})")
        raw = read_json(directory / CONFIG_NAME)
        kind = raw.get("kind")
        if kind not in _KINDS:
            raise WeightsError(f"{directory}: config kind is {kind!r}, expected {CLASSIFIER_KIND!r}")
        try:
            config = ClassifierConfig.from_dict(raw)
        except (TypeError, ValueError) as e:
            raise WeightsError(f"{directory / CONFIG_NAME}: invalid classifier config ({e})") from None
        state = load_state_dict(directory / WEIGHTS_NAME)
        model = cls(config)
        load_strict(model, state, directory / WEIGHTS_NAME)
        return model.eval()


# ----------------------------------------------------------------------------------------------------------------
# training


@contextlib.contextmanager
def _deterministic(seed: int) -> Iterator[None]:
    """Seed torch's global RNG and turn deterministic algorithms on, restoring both afterwards."""
    was = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.use_deterministic_algorithms(True)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(was, warn_only=warn_only)


def _augment(x: torch.Tensor, gen: torch.Generator, *, max_rotate_deg: float = 12.0, max_scale: float = 0.1,
             max_translate_px: float = 2.0, max_shear: float = 0.1, down_up_prob: float = 0.5,
             background: float = -1.0) -> torch.Tensor:
    """Random small affine warp of each image, then the down-up blur on about ``down_up_prob`` of them.

    ``x`` is float ``(B, C, H, W)`` in ``[-1, 1]``; out-of-frame pixels are ``background`` (-1 black, 1 white).
    """
    b = x.shape[0]
    u = torch.rand(b, 5, generator=gen) * 2 - 1  # uniform in [-1, 1]
    angle = u[:, 0] * math.radians(max_rotate_deg)
    scale = 1.0 + u[:, 1] * max_scale
    shear = u[:, 2] * max_shear
    shift = u[:, 3:5] * (2.0 * max_translate_px / x.shape[-1])  # normalised coordinates span 2 over the side
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin + shear, shift[:, 0]], 1),
                         torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    warped = F.grid_sample(x - background, grid, mode="bilinear", padding_mode="zeros",
                           align_corners=False) + background
    if down_up_prob > 0:
        pick = (torch.rand(b, generator=gen) < down_up_prob).view(b, 1, 1, 1)
        warped = torch.where(pick, _down_up_tensor(warped), warped)
    return warped


def _progress(enabled: bool):
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (TextColumn("[bold]classifier"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
               TimeElapsedColumn(), TimeRemainingColumn())
    return Progress(*columns, disable=not enabled, transient=False)


def train_classifier(images: Any, labels: Any, *, config: ClassifierConfig | None = None, steps: int = 800,
                     batch_size: int = 64, lr: float = 2e-3, weight_decay: float = 0.05, warmup_steps: int = 50,
                     label_smoothing: float = 0.05, seed: int = 0, augment: bool = True, progress: bool = True,
                     sources: Any = None, down_up_prob: float = 0.5, background: float = -1.0
                     ) -> tuple[ImageClassifier, dict[str, Any]]:
    """Train an :class:`ImageClassifier` on uint8 ``images`` of the config's size and channels and int
    ``labels (N,)``; with ``sources (N,)`` (needs ``config.num_sources``) the source head learns them too (the
    loss is the sum of the two cross-entropies).

    AdamW with linear warm-up then cosine decay to zero; batches are drawn with replacement-free shuffles
    (a new permutation per epoch). With ``augment``, each batch gets a random affine warp (out-of-frame pixels
    ``background``: -1 black, 1 white) and, for ``down_up_prob`` of the images, the half-resolution down-up blur.
    Everything random comes from ``seed``: the same seed, data, torch build and thread count give bit-identical
    weights. The caller's global RNG state and determinism flag are left as they were.

    Returns ``(model in eval mode, record)``; the record holds steps, batch_size, lr, seed, wall_seconds,
    final_loss (mean loss of the last ``min(50, steps)`` steps), n_train and the rest of the settings.
    A non-finite loss raises :class:`TrainingError`.
    """
    config = config or ClassifierConfig()
    images = check_images(images, size=config.image_size, channels=config.channels)
    labels = _check_labels(labels, images.shape[0], config.num_classes, "labels")
    if sources is not None:
        if not config.num_sources:
            raise DataError("sources given, but the config has no source head (set num_sources)")
        sources = _check_labels(sources, images.shape[0], config.num_sources, "sources")
    if steps < 1 or batch_size < 1:
        raise ValueError("steps and batch_size must be >= 1")
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive finite number, got {lr}")

    x_all = to_input(images, size=config.image_size, channels=config.channels)
    y_all = torch.from_numpy(labels.astype(np.int64))
    s_all = None if sources is None else torch.from_numpy(sources.astype(np.int64))
    n = x_all.shape[0]
    batch_size = min(batch_size, n)
    t0 = time.perf_counter()
    with _deterministic(seed):
        gen = torch.Generator().manual_seed(seed)
        model = ImageClassifier(config)
        model.train()
        decay = [p for name, p in model.named_parameters() if p.ndim > 1]
        no_decay = [p for name, p in model.named_parameters() if p.ndim <= 1]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.99))
        warmup = min(warmup_steps, steps // 10)
        order = torch.randperm(n, generator=gen)
        cursor = 0
        recent: list[float] = []
        with _progress(progress) as bar:
            task = bar.add_task("train", total=steps, info="")
            for step in range(steps):
                if step < warmup:
                    step_lr = lr * (step + 1) / warmup
                else:
                    step_lr = 0.5 * lr * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))
                for group in opt.param_groups:
                    group["lr"] = step_lr
                if cursor + batch_size > n:
                    order, cursor = torch.randperm(n, generator=gen), 0
                idx = order[cursor:cursor + batch_size]
                cursor += batch_size
                xb, yb = x_all[idx], y_all[idx]
                if augment:
                    xb = _augment(xb, gen, down_up_prob=down_up_prob, background=background)
                feats = model.dropout(model.features(xb))
                loss = F.cross_entropy(model.head(feats), yb, label_smoothing=label_smoothing)
                if s_all is not None:
                    loss = loss + F.cross_entropy(model.source_head(feats), s_all[idx],
                                                  label_smoothing=label_smoothing)
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise TrainingError(f"classifier training: loss became {value} at step {step + 1} "
                                        f"(lr={lr:g}); lower the learning rate")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                recent.append(value)
                if len(recent) > 50:
                    recent.pop(0)
                if step % 10 == 0 or step == steps - 1:
                    bar.update(task, completed=step + 1, info=f"loss {sum(recent) / len(recent):.4f}")
    model.eval()
    record = {
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "wall_seconds": round(time.perf_counter() - t0, 3),
        "final_loss": sum(recent) / len(recent),
        "n_train": n,
        "weight_decay": weight_decay,
        "warmup_steps": warmup,
        "label_smoothing": label_smoothing,
        "augment": augment,
        "down_up_prob": down_up_prob,
        "background": background,
        "with_sources": sources is not None,
        "config": config.to_dict(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    return model, record


def _check_labels(labels: Any, n: int, k: int, what: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{what}: expected {n} integers, got shape {labels.shape} dtype {labels.dtype}")
    if labels.min() < 0 or labels.max() >= k:
        raise DataError(f"{what}: expected values in 0..{k - 1}, got {labels.min()}..{labels.max()}")
    return labels


DigitClassifier = ImageClassifier  # the name the 28x28 digit judge has always had
