"""The learned composition weights' modules: heads that read which source a noisy ``x_t`` came from.

- :class:`AttentionPoolHead`: tokens (B, L, D) -> one logit, a learned query attending over one forward's
  mid-block tokens; the ``router`` and ``isolated`` weightings use one per compartment.
- :class:`HeadBank`: n such heads, head i on the tokens of compartment i's forward.
- :class:`NoisyClassifier`: a small CNN ``f(x_t, t)`` over the sources (the ``classifier`` weighting).

Plus loading them from stored tensors and the tensors the store writes. The weightings that use them are in
:mod:`cdm.composition.learned`, their training in :mod:`cdm.composition.head_training`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..backbone import timestep_embedding
from ..io import load_strict

__all__ = ["AttentionPoolHead", "HeadBank", "NoisyClassifier", "load_head", "load_head_bank", "load_noisy_classifier",
           "one_logit", "state_tensors"]


# ----------------------------------------------------------------------------------------------- modules


class AttentionPoolHead(nn.Module):
    """Tokens (B, L, D) -> one logit per sample (B,): LayerNorm, a learned query attends over the tokens
    (``num_heads`` heads), a projection, then a linear read-out. The time token is among the tokens, so no
    separate time input is needed. The read-out starts at zero: an untrained head gives uniform weights."""

    def __init__(self, dim: int, num_heads: int = 1):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"token width {dim} is not a multiple of num_heads {num_heads}")
        self.dim, self.num_heads = dim, num_heads
        self.norm = nn.LayerNorm(dim)
        self.query = nn.Parameter(torch.zeros(1, num_heads, 1, dim // num_heads))
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, 1)
        nn.init.trunc_normal_(self.query, std=0.02)
        nn.init.trunc_normal_(self.kv.weight, std=0.02)
        nn.init.zeros_(self.kv.bias)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def arch(self) -> dict:
        return {"dim": self.dim, "num_heads": self.num_heads}

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        b, n, d = tokens.shape
        h = self.num_heads
        kv = self.kv(self.norm(tokens)).view(b, n, 2, h, d // h).permute(2, 0, 3, 1, 4)  # (2, B, H, L, Dh)
        pooled = F.scaled_dot_product_attention(self.query.expand(b, -1, -1, -1), kv[0], kv[1])  # (B, H, 1, Dh)
        return self.out(self.proj(pooled.reshape(b, d))).squeeze(-1)


def one_logit(module: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """``module(features)`` as one logit per sample, shape (B,); any other number of outputs is refused."""
    out = module(features)
    if out.numel() != features.shape[0]:
        raise ValueError(f"a head must return one logit per sample, got shape {tuple(out.shape)}")
    return out.reshape(features.shape[0])


class HeadBank(nn.Module):
    """n heads; head i reads the tokens of compartment i's forward: ``forward(mid (B, n, L, D)) -> (B, n)``.

    Any modules mapping (B, L, D) to one logit per sample work (tests use plain linear maps);
    :meth:`create` builds :class:`AttentionPoolHead` s, the kind cdm trains and stores."""

    def __init__(self, heads: Sequence[nn.Module]):
        super().__init__()
        if not heads:
            raise ValueError("a head bank needs at least one head")
        self.heads = nn.ModuleList(heads)

    @classmethod
    def create(cls, n: int, dim: int, num_heads: int = 1) -> HeadBank:
        return cls([AttentionPoolHead(dim, num_heads) for _ in range(n)])

    def __len__(self) -> int:
        return len(self.heads)

    def select(self, columns: Sequence[int]) -> HeadBank:
        """The heads for ``columns``, in that order (modules shared, not copied)."""
        return HeadBank([self.heads[int(i)] for i in columns])

    def forward(self, mid: torch.Tensor, active: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, n); with ``active`` (B, n) bool only those pairs are evaluated (the others are 0)."""
        b, n = mid.shape[:2]
        if n != len(self.heads):
            raise ValueError(f"{len(self.heads)} heads for tokens of {n} compartments")
        cols = []
        for i, head in enumerate(self.heads):
            if active is None:
                cols.append(one_logit(head, mid[:, i]))
                continue
            col = torch.zeros(b, dtype=mid.dtype, device=mid.device)
            rows = active[:, i].nonzero()[:, 0]
            if rows.numel():
                col = col.index_put((rows,), one_logit(head, mid[rows, i]).to(col.dtype))
            cols.append(col)
        return torch.stack(cols, dim=1)


class NoisyClassifier(nn.Module):
    """``f(x_t, t) -> (B, n)`` logits over the sources: a small CNN on the model-space image (B, C, S, S) with a
    sinusoidal time embedding (as the U-ViT's) that shifts the features of its second stage."""

    def __init__(self, n_sources: int, *, img_size: int = 14, in_chans: int = 1, channels: int = 32,
                 time_dim: int = 64):
        super().__init__()
        if n_sources < 1:
            raise ValueError("a noisy classifier needs at least one source")
        self.config = {"n_sources": n_sources, "img_size": img_size, "in_chans": in_chans, "channels": channels,
                       "time_dim": time_dim}
        c = channels
        groups = lambda k: math.gcd(8, k)  # noqa: E731
        self.time_dim = time_dim
        self.time = nn.Sequential(nn.Linear(time_dim, 2 * c), nn.SiLU(), nn.Linear(2 * c, 2 * c))
        self.conv1 = nn.Conv2d(in_chans, c, 3, padding=1)
        self.norm1 = nn.GroupNorm(groups(c), c)
        self.conv2 = nn.Conv2d(c, 2 * c, 3, stride=2, padding=1)
        self.norm2 = nn.GroupNorm(groups(2 * c), 2 * c)
        self.conv3 = nn.Conv2d(2 * c, 2 * c, 3, stride=2, padding=1)
        self.norm3 = nn.GroupNorm(groups(2 * c), 2 * c)
        self.out = nn.Linear(2 * c, n_sources)

    def arch(self) -> dict:
        return dict(self.config)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        temb = self.time(timestep_embedding(t, self.time_dim).to(x.dtype))
        h = F.silu(self.norm1(self.conv1(x)))
        h = F.silu(self.norm2(self.conv2(h)) + temb[:, :, None, None])
        h = F.silu(self.norm3(self.conv3(h)))
        return self.out(h.mean(dim=(2, 3)))


# ----------------------------------------------------------------------------------------------- loading


def _tensors_to(module: nn.Module, tensors: dict[str, torch.Tensor], origin: str) -> nn.Module:
    load_strict(module, tensors, origin)
    return module.eval().requires_grad_(False)


def load_head_bank(tensors: dict[str, torch.Tensor], arch: dict, origin: str = "router") -> HeadBank:
    """A :class:`HeadBank` of attention-pooling heads from its state dict and ``arch`` (n, dim, num_heads)."""
    bank = HeadBank.create(int(arch["n"]), int(arch["dim"]), int(arch.get("num_heads", 1)))
    return _tensors_to(bank, tensors, origin)


def load_head(tensors: dict[str, torch.Tensor], arch: dict, origin: str = "isolated head") -> AttentionPoolHead:
    return _tensors_to(AttentionPoolHead(int(arch["dim"]), int(arch.get("num_heads", 1))), tensors, origin)


def load_noisy_classifier(tensors: dict[str, torch.Tensor], arch: dict,
                          origin: str = "noisy classifier") -> NoisyClassifier:
    arch = dict(arch)
    n = int(arch.pop("n_sources"))
    return _tensors_to(NoisyClassifier(n, **{k: int(v) for k, v in arch.items()}), tensors, origin)


def state_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """A module's state dict as contiguous, detached CPU copies (what the store writes as safetensors), wherever the
    module lives."""
    return {k: v.detach().cpu().clone().contiguous() for k, v in module.state_dict().items()}
