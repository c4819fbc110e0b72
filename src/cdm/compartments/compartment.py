"""A compartment: deep prompts for the frozen backbone, trained on one data source and nothing else.

Everything the system learns from a source lives in its compartment's prompt table; the backbone never
changes. Forgetting the source means deleting the compartment.

Layout of the table (a :class:`PromptTable`, rows of ``n_blocks * P * D`` numbers):

- class-conditional (``conditional=True``): one prompt set per class, plus a last row for the source's
  *unconditional* prompts (trained on a ``label_dropout`` share of the batches). The unconditional row is what
  classifier-free guidance and unconditional composition use.
- unconditional: a single row.

The backbone gets the sample's class token (the null class for unconditional rows): a compartment starts from
the public backbone's class-conditional prediction, and everything it learns about its source lives in the
prompts.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..backbone import Backbone
from ..errors import WeightsError
from ..io import config_from_dict

__all__ = ["Compartment", "CompartmentConfig", "PromptTable"]


@dataclass(frozen=True)
class CompartmentConfig:
    n_prompts: int = 8  # P per block; 4 / 8 / 16 were within 0.5% in held-out loss (early backbone, 300 steps)
    conditional: bool = True  # one prompt set per class (+ unconditional row); False: one set for the source
    gated: bool = True  # zero-init gated prompt attention (starts exactly at the backbone); False: the paper's
    #                     joint-softmax deep prompts (start perturbed: held-out loss 0.123 vs the backbone's 0.077)
    steps: int = 2000  # optimiser steps
    batch_size: int = 64
    lr: float = 0.01  # Adam; gated, 450 digits, step 100: held-out 0.0787 at lr 0.1, 0.0772 at 0.01 (backbone 0.0769)
    lr_schedule: str = "cosine"  # "constant" or "cosine" (to 10% of lr) after warm-up
    warmup: int = 50  # linear warm-up steps
    label_dropout: float = 0.1  # share of samples trained on the unconditional row (conditional only)
    init_std: float = 0.02  # prompt initialisation (normal)
    grad_clip: float = 1.0  # max grad norm of the prompt table
    validation: float = 0.1  # share of the source (lowest sample hashes) held out to pick the best step; 0: last step
    validate_every: int = 50  # steps between validation losses (step 0, the backbone itself when gated, included)
    seed: int = 0
    checkpoint_every: int = 250  # steps between resumable checkpoints

    def __post_init__(self) -> None:
        problems = []
        if self.n_prompts < 1:
            problems.append(f"n_prompts must be >= 1 (got {self.n_prompts})")
        if self.steps < 1 or self.batch_size < 1:
            problems.append(f"steps and batch_size must be >= 1 (got {self.steps}, {self.batch_size})")
        if not (math.isfinite(self.lr) and self.lr > 0):
            problems.append(f"lr must be a positive number (got {self.lr})")
        if not 0 <= self.label_dropout < 1:
            problems.append(f"label_dropout must be in [0, 1) (got {self.label_dropout})")
        if not 0 <= self.validation < 0.5 or self.validate_every < 1:
            problems.append(f"validation must be in [0, 0.5) and validate_every >= 1 (got {self.validation}, "
                            f"{self.validate_every})")
        if self.lr_schedule not in ("constant", "cosine"):
            problems.append(f"lr_schedule must be 'constant' or 'cosine' (got {self.lr_schedule!r})")
        if problems:
            raise ValueError("; ".join(problems))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> CompartmentConfig:
        if isinstance(d, dict) and "gated" not in d:  # written before gates and validation existed
            d = {"validation": 0.0, **d, "gated": False}
        return config_from_dict(cls, d, "compartment")


class PromptTable(nn.Module):
    """Prompt sets looked up by index. An ``nn.Embedding`` holds them so that per-sample gradients (Opacus)
    work: the module's forward takes the batch (the row index of each sample) and returns the backbone's
    prompt keywords ``{"prompts": (B, n_blocks, P, D), "prompt_gate": (B, n_blocks, H) or None}``.

    A row is ``n_blocks * P * D`` prompt numbers followed, for gated prompts, by ``n_blocks * H`` gates."""

    def __init__(self, n_sets: int, n_blocks: int, n_prompts: int, dim: int, n_heads: int = 0):
        super().__init__()
        self.shape = (n_blocks, n_prompts, dim)
        self.gate_shape = (n_blocks, n_heads) if n_heads else None
        self.n_prompt_numbers = n_blocks * n_prompts * dim
        self.table = nn.Embedding(n_sets, self.n_prompt_numbers + n_blocks * n_heads)

    def split(self, rows: torch.Tensor) -> dict[str, torch.Tensor | None]:
        """Flat table rows (B, width) -> the backbone's prompt keywords."""
        b, n = rows.shape[0], self.n_prompt_numbers
        gate = None if self.gate_shape is None else rows[:, n:].reshape(b, *self.gate_shape)
        return {"prompts": rows[:, :n].reshape(b, *self.shape), "prompt_gate": gate}

    def forward(self, index: torch.Tensor) -> dict[str, torch.Tensor | None]:
        return self.split(self.table(index))


class Compartment(nn.Module):
    """Prompts for one source. ``eps(backbone, x, t, y=None)`` is its denoiser; ``y=None`` (or the null class)
    selects the unconditional prompts."""

    def __init__(self, config: CompartmentConfig, *, n_blocks: int, dim: int, num_classes: int, null_class: int | None,
                 num_heads: int = 0):
        super().__init__()
        if config.conditional and null_class is None:
            raise ValueError("a class-conditional compartment needs a backbone with a null class")
        self.config = config
        self.num_classes = num_classes  # real classes (labels 0..num_classes-1)
        self.null_class = null_class
        n_sets = num_classes + 1 if config.conditional else 1
        if config.gated and num_heads < 1:
            raise ValueError("gated prompts need the backbone's number of heads")
        self.prompts = PromptTable(n_sets, n_blocks, config.n_prompts, dim, num_heads if config.gated else 0)

    @classmethod
    def for_backbone(cls, backbone: Backbone, config: CompartmentConfig) -> Compartment:
        c = backbone.config
        n_real = c.num_classes - (1 if c.null_class is not None else 0) if c.num_classes > 0 else 0
        return cls(config, n_blocks=c.n_blocks, dim=c.embed_dim, num_classes=n_real, null_class=c.null_class,
                   num_heads=c.num_heads)

    def init_prompts(self, generator: torch.Generator) -> None:
        """Prompts ~ N(0, init_std^2); gates at zero (the compartment starts as the backbone)."""
        with torch.no_grad():
            w = self.prompts.table.weight
            w.copy_(torch.randn(w.shape, generator=generator) * self.config.init_std)
            w[:, self.prompts.n_prompt_numbers:] = 0

    def row(self, y: torch.Tensor | None, batch: int) -> torch.Tensor:
        """Prompt-table row of each sample: its class, or the unconditional row for None / the null class."""
        if not self.config.conditional:
            return torch.zeros(batch, dtype=torch.long)
        uncond = self.num_classes
        if y is None:
            return torch.full((batch,), uncond, dtype=torch.long)
        y = y.expand(batch) if y.ndim == 0 else y
        return torch.where(y == self.null_class, torch.full_like(y, uncond), y).long()

    def backbone_labels(self, y: torch.Tensor | None, batch: int) -> torch.Tensor | None:
        """The label token the backbone gets: the sample's class for a class-conditional compartment (so the
        compartment starts from the backbone's own class-conditional prediction and its prompts refine it),
        the null class otherwise."""
        null = self.null_class
        if null is None:
            return None
        if not self.config.conditional or y is None:
            return torch.full((batch,), null, dtype=torch.long)
        return (y.expand(batch) if y.ndim == 0 else y).long()

    def eps(self, backbone: Backbone, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        prompt_kw = self.prompts(self.row(y, x.shape[0]).to(x.device))
        labels = self.backbone_labels(y, x.shape[0])
        return backbone.net(x, t, y=None if labels is None else labels.to(x.device), **prompt_kw)

    def denoiser(self, backbone: Backbone):
        """A plain denoiser callable ``eps(x, t, y=None)`` for the solvers."""

        def eps(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
            return self.eps(backbone, x, t, y)

        return eps

    # -- tensors on disk (the store adds manifests and hashes) ----------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        return {"prompts": self.prompts.table.weight.detach().clone()}

    def load_tensors(self, tensors: dict[str, torch.Tensor], origin: str = "compartment") -> None:
        if set(tensors) != {"prompts"}:
            raise WeightsError(f"{origin}: expected exactly one tensor 'prompts', got {sorted(tensors)}")
        w = self.prompts.table.weight
        if tuple(tensors["prompts"].shape) != tuple(w.shape):
            raise WeightsError(f"{origin}: prompts have shape {tuple(tensors['prompts'].shape)}, this backbone and "
                               f"config need {tuple(w.shape)}")
        with torch.no_grad():
            w.copy_(tensors["prompts"])
