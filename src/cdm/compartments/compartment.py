"""A compartment: deep prompts for the frozen backbone, trained on one data source and nothing else.

Everything the system learns from a source lives in its compartment's prompt table; the backbone never
changes. Forgetting the source means deleting the compartment.

Layout of the table (a :class:`PromptTable`, rows of ``n_blocks * P * D`` numbers):

- class-conditional (``conditional=True``): one prompt set per class, plus a last row for the source's
  *unconditional* prompts (trained on a ``label_dropout`` share of the batches). The unconditional row is what
  classifier-free guidance and unconditional composition use.
- unconditional: a single row.
- text-conditioned (``text_encoder`` set; the paper's text-to-image compartments): a single row of base prompts
  (and gates), plus a linear map from the caption's embedding to ``text_tokens`` more prompt tokens, the same in
  every block. The empty caption (trained on a ``label_dropout`` share of the batches) is the unconditional
  branch of classifier-free guidance.

Any compartment may add *parallel adapters* (``adapter_rank`` > 0) beside every block's MLP:
``x + mlp(h) + up(gelu(down(h)))`` with ``h = norm2(x)``; ``up`` starts at zero, so the compartment still starts
exactly at the backbone. They add capacity where prompts act only through attention.

Any compartment may also add *LoRA* (``lora_rank`` > 0): low-rank updates ``W + a b`` of every block's attention
``qkv`` / ``proj`` and MLP ``fc1`` / ``fc2`` (:class:`LoRAFactors`); ``b`` starts at zero, so again the compartment
starts exactly at the backbone.

The backbone gets the sample's class token (the null class for unconditional rows): a compartment starts from
the public backbone's class-conditional prediction, and everything it learns about its source lives in the
prompts.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..backbone import Backbone
from ..errors import WeightsError
from ..io import config_from_dict

__all__ = ["Adapters", "Compartment", "CompartmentConfig", "LoRAFactors", "PromptTable", "net_inputs"]


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
    text_encoder: str | None = None  # condition on captions embedded by this registered encoder (cdm.text); None:
    #                                  on class labels (conditional) or nothing. Implies conditional=False
    text_tokens: int = 4  # text compartments: prompt tokens per block made from the caption by one linear map
    adapter_rank: int = 0  # parallel FFN adapters of this width in every block; 0: prompts only
    lora_rank: int = 0  # LoRA of this rank on every block's attention qkv / proj and MLP fc1 / fc2; 0: none

    def __post_init__(self) -> None:
        if self.text_encoder is not None and self.conditional:  # captions replace class rows
            object.__setattr__(self, "conditional", False)
        problems = []
        if self.text_encoder is not None and (not isinstance(self.text_encoder, str) or not self.text_encoder):
            problems.append(f"text_encoder must be a registered encoder name (got {self.text_encoder!r})")
        if self.text_tokens < 1 or self.adapter_rank < 0:
            problems.append(f"text_tokens must be >= 1 and adapter_rank >= 0 (got {self.text_tokens}, "
                            f"{self.adapter_rank})")
        if self.n_prompts < 1:
            problems.append(f"n_prompts must be >= 1 (got {self.n_prompts})")
        if isinstance(self.lora_rank, bool) or not isinstance(self.lora_rank, int) or self.lora_rank < 0:
            problems.append(f"lora_rank must be a whole number >= 0 (0: no LoRA; got {self.lora_rank!r})")
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

    @property
    def text(self) -> bool:
        """Conditioned on captions."""
        return self.text_encoder is not None

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


class Adapters(nn.Module):
    """Parallel FFN adapters, one per block: ``down`` (n_blocks, D, r), ``up`` (n_blocks, r, D)."""

    def __init__(self, n_blocks: int, dim: int, rank: int):
        super().__init__()
        self.down = nn.Parameter(torch.zeros(n_blocks, dim, rank))
        self.up = nn.Parameter(torch.zeros(n_blocks, rank, dim))


class LoRAFactors(nn.Module):
    """LoRA on every block's ``qkv``, ``proj``, ``fc1`` and ``fc2`` linears (``W x + b(a(x))``): parameters
    ``<target>_a`` (n_blocks, in, r) and ``<target>_b`` (n_blocks, r, out); ``b`` starts at zero."""

    def __init__(self, n_blocks: int, dim: int, hidden: int, rank: int):
        super().__init__()
        self.shapes = {"qkv": (dim, 3 * dim), "proj": (dim, dim), "fc1": (dim, hidden), "fc2": (hidden, dim)}
        for name, (n_in, n_out) in self.shapes.items():
            setattr(self, f"{name}_a", nn.Parameter(torch.zeros(n_blocks, n_in, rank)))
            setattr(self, f"{name}_b", nn.Parameter(torch.zeros(n_blocks, rank, n_out)))

    def factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{target: (a, b)}`` with a leading axis of 1: the backbone's ``lora`` keyword for every row."""
        return {name: (getattr(self, f"{name}_a").unsqueeze(0), getattr(self, f"{name}_b").unsqueeze(0))
                for name in self.shapes}


def net_inputs(split: dict[str, torch.Tensor | None], text_tokens: torch.Tensor | None = None,
               adapters: tuple[torch.Tensor, torch.Tensor] | None = None,
               lora: dict | None = None) -> dict[str, torch.Tensor | None]:
    """The backbone's keywords from per-row prompt-table rows (``PromptTable.split``), optional per-row text tokens
    (B, T, D), appended to every block's prompts, optional adapters ``(down, up)`` (B or 1, n_blocks, ...) and
    optional LoRA factors (``UViT``'s ``lora``: ``{target: (a, b)}``, plus ``"index"`` for stacked sets)."""
    out = dict(split)
    if text_tokens is not None:
        p = out["prompts"]
        t = text_tokens.to(p.dtype).unsqueeze(1).expand(-1, p.shape[1], -1, -1)
        out["prompts"] = torch.cat([p.expand(t.shape[0], -1, -1, -1), t], dim=2)
    if adapters is not None:
        out["adapters"] = adapters
    if lora is not None:
        out["lora"] = lora
    return out


def _moved(v, device: torch.device):
    """Tensors in ``v`` (a tensor, or dicts / tuples / lists of them) moved to ``device``, differentiably."""
    if torch.is_tensor(v):
        return v.to(device)
    if isinstance(v, dict):
        return {k: _moved(x, device) for k, x in v.items()}
    if isinstance(v, (tuple, list)):
        return type(v)(_moved(x, device) for x in v)
    return v


class Compartment(nn.Module):
    """Prompts (and optionally a caption map, adapters and LoRA) for one source. ``eps(backbone, x, t, y=None,
    text=None)`` is its denoiser; ``y=None`` (or the null class) selects the unconditional prompts; a text
    compartment reads ``text`` (B, text_dim) caption embeddings (the empty caption's is its unconditional branch)."""

    def __init__(self, config: CompartmentConfig, *, n_blocks: int, dim: int, num_classes: int, null_class: int | None,
                 num_heads: int = 0, text_dim: int = 0, mlp_hidden: int = 0):
        super().__init__()
        if config.conditional and null_class is None:
            raise ValueError("a class-conditional compartment needs a backbone with a null class")
        if config.text and text_dim < 1:
            raise ValueError("a text compartment needs its encoder's embedding width")
        self.config = config
        self.num_classes = num_classes  # real classes (labels 0..num_classes-1)
        self.null_class = null_class
        n_sets = num_classes + 1 if config.conditional else 1
        if config.gated and num_heads < 1:
            raise ValueError("gated prompts need the backbone's number of heads")
        self.prompts = PromptTable(n_sets, n_blocks, config.n_prompts, dim, num_heads if config.gated else 0)
        self.text_dim = text_dim if config.text else 0
        self.text_proj = nn.Linear(text_dim, config.text_tokens * dim) if config.text else None
        self.adapters = Adapters(n_blocks, dim, config.adapter_rank) if config.adapter_rank else None
        # mlp_hidden: the backbone's MLP width (0: 4 * dim, the U-ViT default)
        self.lora = LoRAFactors(n_blocks, dim, mlp_hidden or 4 * dim, config.lora_rank) if config.lora_rank else None
        self.dim = dim

    @classmethod
    def for_backbone(cls, backbone: Backbone, config: CompartmentConfig) -> Compartment:
        c = backbone.config
        n_real = c.num_classes - (1 if c.null_class is not None else 0) if c.num_classes > 0 else 0
        text_dim = 0
        if config.text:
            from ..text import text_dim as width  # the encoder's width, without loading it

            text_dim = width(config.text_encoder)
        return cls(config, n_blocks=c.n_blocks, dim=c.embed_dim, num_classes=n_real, null_class=c.null_class,
                   num_heads=c.num_heads, text_dim=text_dim, mlp_hidden=int(c.embed_dim * c.mlp_ratio))

    def init_prompts(self, generator: torch.Generator) -> None:
        """Prompts, the caption map, adapters' ``down`` and LoRA's ``a`` ~ N(0, init_std^2) (drawn in that order);
        gates, biases, adapters' ``up`` and LoRA's ``b`` at zero (the compartment starts as the backbone)."""
        std = self.config.init_std
        with torch.no_grad():
            w = self.prompts.table.weight
            w.copy_(torch.randn(w.shape, generator=generator) * std)
            w[:, self.prompts.n_prompt_numbers:] = 0
            if self.text_proj is not None:
                self.text_proj.weight.copy_(torch.randn(self.text_proj.weight.shape, generator=generator) * std)
                self.text_proj.bias.zero_()
            if self.adapters is not None:
                self.adapters.down.copy_(torch.randn(self.adapters.down.shape, generator=generator) * std)
                self.adapters.up.zero_()
            if self.lora is not None:
                for a, b in self.lora.factors().values():
                    a.copy_(torch.randn(a.shape, generator=generator) * std)
                    b.zero_()

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

    def check_text(self, text: torch.Tensor | None, batch: int) -> torch.Tensor | None:
        """The caption embeddings a text compartment needs ((B or 1, text_dim)); None for the others."""
        if self.text_proj is None:
            if text is not None:
                raise ValueError("this compartment is not text-conditioned: it takes no caption")
            return None
        if text is None:
            raise ValueError("a text compartment needs caption embeddings (the empty caption's for unconditional)")
        text = text.reshape(1, -1) if text.ndim == 1 else text
        if text.ndim != 2 or text.shape[1] != self.text_dim or text.shape[0] not in (1, batch):
            raise ValueError(f"caption embeddings must be (B or 1, {self.text_dim}), got {tuple(text.shape)}")
        return text.expand(batch, -1)

    def net_kwargs(self, y: torch.Tensor | None, text: torch.Tensor | None, batch: int,
                   device: torch.device | str = "cpu") -> dict:
        """The backbone's keywords (label, prompts, gates, adapters, LoRA) for ``batch`` rows of this compartment."""
        text = self.check_text(text, batch)
        split = self.prompts(self.row(y, batch).to(device))
        tokens = None
        if text is not None:
            tokens = self.text_proj(text.to(device, self.text_proj.weight.dtype)).view(batch, -1, self.dim)
        adapters = None if self.adapters is None else (self.adapters.down.unsqueeze(0), self.adapters.up.unsqueeze(0))
        lora = None if self.lora is None else self.lora.factors()
        labels = self.backbone_labels(y, batch)
        return {"y": None if labels is None else labels.to(device), **net_inputs(split, tokens, adapters, lora)}

    @property
    def n_parameters(self) -> int:
        """Numbers the compartment learns (prompts and gates, caption map, adapters, LoRA factors)."""
        return sum(p.numel() for p in self.parameters())

    @property
    def device(self) -> torch.device:
        """Where the compartment's tensors live (training puts them on the backbone's device)."""
        return self.prompts.table.weight.device

    def eps(self, backbone: Backbone, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
            text: torch.Tensor | None = None) -> torch.Tensor:
        """The keywords are made where the compartment lives and handed to the backbone on its device
        (differentiably: a compartment on the CPU still trains through a backbone on an accelerator)."""
        kwargs = self.net_kwargs(y, text, x.shape[0], self.device)
        if self.device != backbone.device:
            kwargs = _moved(kwargs, backbone.device)
        return backbone.net(x, t, **kwargs)

    def denoiser(self, backbone: Backbone):
        """A plain denoiser callable ``eps(x, t, y=None, text=None)`` for the solvers. A frozen compartment (no
        parameter needs a gradient, e.g. one loaded from a store) that lives elsewhere than the backbone is read
        through a copy on the backbone's device, made once here; this compartment stays where it is."""
        comp = self
        if self.device != backbone.device and not any(p.requires_grad for p in self.parameters()):
            comp = copy.deepcopy(self).to(backbone.device)

        def eps(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
                text: torch.Tensor | None = None) -> torch.Tensor:
            return comp.eps(backbone, x, t, y, text)

        return eps

    # -- tensors on disk (the store adds manifests and hashes) ----------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        """``prompts`` (the table), plus ``text_proj.weight`` / ``text_proj.bias``, ``adapters.down`` /
        ``adapters.up`` and ``lora.<target>_a`` / ``lora.<target>_b`` when the config has them."""
        out = {"prompts": self.prompts.table.weight.detach().cpu().clone()}  # on the CPU, wherever it trained
        for name, v in self.named_parameters():
            if not name.startswith("prompts."):
                out[name] = v.detach().cpu().clone()
        return out

    def load_tensors(self, tensors: dict[str, torch.Tensor], origin: str = "compartment") -> None:
        want = self.tensors()
        if set(tensors) != set(want):
            raise WeightsError(f"{origin}: expected the tensors {sorted(want)}, got {sorted(tensors)}")
        for name, v in want.items():
            if tuple(tensors[name].shape) != tuple(v.shape):
                raise WeightsError(f"{origin}: {name} has shape {tuple(tensors[name].shape)}, this backbone and "
                                   f"config need {tuple(v.shape)}")
        params = dict(self.named_parameters())
        with torch.no_grad():
            self.prompts.table.weight.copy_(tensors["prompts"])
            for name, v in tensors.items():
                if name != "prompts":
                    params[name].copy_(v)
