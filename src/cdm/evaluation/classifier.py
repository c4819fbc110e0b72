"""A small CNN that recognises 28x28 digits, used to judge generated samples and as the feature network for FID.

Images on the way in are uint8 arrays ``(N, 28, 28)`` (white digit on black, MNIST style); the network itself sees
float tensors ``(N, 1, 28, 28)`` scaled to ``[-1, 1]`` (:func:`to_input` does the conversion).

The generators this classifier judges produce 14x14 images that are upsampled to 28x28 bilinearly, so training
augments with a "down-up" blur (:func:`down_up`) half of the time, next to a small random affine warp.

Weights are stored as a directory: ``config.json`` (with ``"kind": "digit-classifier"``), ``model.safetensors``
and, optionally, ``training.json`` (the record :func:`train_classifier` returns).
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
    "check_images",
    "down_up",
    "to_input",
    "train_classifier",
]

CLASSIFIER_KIND = "digit-classifier"
TRAINING_RECORD_NAME = "training.json"
IMAGE_SIZE = 28


# ----------------------------------------------------------------------------------------------------------------
# images


def check_images(images: Any, what: str = "images") -> np.ndarray:
    """Return ``images`` as a uint8 array ``(N, 28, 28)``; ``(N, 1, 28, 28)`` is accepted and squeezed.

    Anything else (another dtype, another size, an empty set) raises :class:`DataError`.
    """
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise DataError(f"{what}: expected uint8 pixels (0..255), got dtype {images.dtype}")
    if images.ndim == 4 and images.shape[1] == 1:
        images = images[:, 0]
    if images.ndim != 3 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise DataError(f"{what}: expected shape (N, {IMAGE_SIZE}, {IMAGE_SIZE}), got {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise DataError(f"{what}: no images")
    return images


def to_input(images: Any) -> torch.Tensor:
    """uint8 images ``(N, 28, 28)`` (or ``(N, 1, 28, 28)``) -> float32 tensor ``(N, 1, 28, 28)`` in ``[-1, 1]``."""
    images = check_images(images)
    return torch.tensor(np.asarray(images)).to(torch.float32).unsqueeze(1) / 127.5 - 1.0


def _down_up_tensor(x: torch.Tensor) -> torch.Tensor:
    """Average-pool 28x28 -> 14x14, then bilinearly upsample back (``align_corners=False``), as the generators do."""
    small = F.avg_pool2d(x, kernel_size=2)
    return F.interpolate(small, size=x.shape[-2:], mode="bilinear", align_corners=False)


def down_up(images: Any) -> np.ndarray:
    """The "down-up" version of uint8 images: what a 14x14 generator upsampled to 28x28 looks like (uint8 out)."""
    x = torch.tensor(np.asarray(check_images(images))).to(torch.float32).unsqueeze(1)
    y = _down_up_tensor(x).round().clamp_(0, 255).to(torch.uint8)
    return y[:, 0].numpy()


# ----------------------------------------------------------------------------------------------------------------
# the network


@dataclass
class ClassifierConfig:
    num_classes: int = 10  # number of digit classes (logits)
    widths: tuple[int, ...] = (32, 64)  # channels of each stage; a stage is two 3x3 convs + 2x2 max-pool (28->14->7)
    feature_dim: int = 128  # size of the penultimate vector: what features() returns and FID is computed on
    dropout: float = 0.2  # dropout on the features before the last linear layer (training only)
    norm: str = "batch"  # normalisation after each conv: "batch" (BatchNorm2d) or "group" (GroupNorm, 8 groups)

    def __post_init__(self) -> None:
        self.widths = tuple(int(w) for w in self.widths)
        problems = []
        if self.num_classes < 2:
            problems.append("num_classes must be >= 2")
        if not self.widths or any(w < 1 for w in self.widths):
            problems.append("widths must be a non-empty list of positive ints")
        if IMAGE_SIZE >> len(self.widths) < 1:
            problems.append(f"at most {int(math.log2(IMAGE_SIZE))} stages")
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


class DigitClassifier(nn.Module):
    """conv-conv-pool stages, then ``Linear -> GELU`` (the features), dropout and ``Linear`` (the logits)."""

    def __init__(self, config: ClassifierConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or ClassifierConfig()
        layers: list[nn.Module] = []
        c_in = 1
        for w in config.widths:
            for _ in range(2):
                layers += [nn.Conv2d(c_in, w, 3, padding=1, bias=False), _norm(config.norm, w), nn.GELU()]
                c_in = w
            layers.append(nn.MaxPool2d(2))
        self.body = nn.Sequential(*layers)
        side = IMAGE_SIZE >> len(config.widths)
        self.to_features = nn.Sequential(nn.Flatten(), nn.Linear(c_in * side * side, config.feature_dim), nn.GELU())
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.feature_dim, config.num_classes)

    @property
    def feature_dim(self) -> int:
        return self.config.feature_dim

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """float ``(N, 1, 28, 28)`` in ``[-1, 1]`` -> penultimate features ``(N, feature_dim)``."""
        return self.to_features(self.body(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """float ``(N, 1, 28, 28)`` in ``[-1, 1]`` -> logits ``(N, num_classes)``."""
        return self.head(self.dropout(self.features(x)))

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
    def from_pretrained(cls, directory: str | os.PathLike) -> DigitClassifier:
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
        if kind != CLASSIFIER_KIND:
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
             max_translate_px: float = 2.0, max_shear: float = 0.1, down_up_prob: float = 0.5) -> torch.Tensor:
    """Random small affine warp of each image, then the down-up blur on about ``down_up_prob`` of them.

    ``x`` is float ``(B, 1, 28, 28)`` in ``[-1, 1]``; out-of-frame pixels are black (-1).
    """
    b = x.shape[0]
    u = torch.rand(b, 5, generator=gen) * 2 - 1  # uniform in [-1, 1]
    angle = u[:, 0] * math.radians(max_rotate_deg)
    scale = 1.0 + u[:, 1] * max_scale
    shear = u[:, 2] * max_shear
    shift = u[:, 3:5] * (2.0 * max_translate_px / IMAGE_SIZE)  # normalised coordinates span 2 over 28 px
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin + shear, shift[:, 0]], 1),
                         torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    warped = F.grid_sample(x + 1.0, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1.0
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
                     label_smoothing: float = 0.05, seed: int = 0, augment: bool = True, progress: bool = True
                     ) -> tuple[DigitClassifier, dict[str, Any]]:
    """Train a :class:`DigitClassifier` on uint8 ``images (N, 28, 28)`` and int ``labels (N,)``.

    AdamW with linear warm-up then cosine decay to zero; batches are drawn with replacement-free shuffles
    (a new permutation per epoch). With ``augment``, each batch gets a random affine warp and, for half of the
    images, the 14x14 down-up blur. Everything random comes from ``seed``: the same seed, data, torch build and
    thread count give bit-identical weights. The caller's global RNG state and determinism flag are left as they
    were.

    Returns ``(model in eval mode, record)``; the record holds steps, batch_size, lr, seed, wall_seconds,
    final_loss (mean loss of the last ``min(50, steps)`` steps), n_train and the rest of the settings.
    A non-finite loss raises :class:`TrainingError`.
    """
    images = check_images(images)
    labels = np.asarray(labels)
    config = config or ClassifierConfig()
    if labels.shape != (images.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"labels: expected {images.shape[0]} integers, got shape {labels.shape} dtype {labels.dtype}")
    if labels.min() < 0 or labels.max() >= config.num_classes:
        raise DataError(f"labels: expected values in 0..{config.num_classes - 1}, got {labels.min()}..{labels.max()}")
    if steps < 1 or batch_size < 1:
        raise ValueError("steps and batch_size must be >= 1")
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive finite number, got {lr}")

    x_all = to_input(images)
    y_all = torch.from_numpy(labels.astype(np.int64))
    n = x_all.shape[0]
    batch_size = min(batch_size, n)
    t0 = time.perf_counter()
    with _deterministic(seed):
        gen = torch.Generator().manual_seed(seed)
        model = DigitClassifier(config)
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
                    xb = _augment(xb, gen)
                loss = F.cross_entropy(model(xb), yb, label_smoothing=label_smoothing)
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
        "config": config.to_dict(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    return model, record
