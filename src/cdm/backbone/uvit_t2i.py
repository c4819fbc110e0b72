"""Text-to-image U-ViT (Bao et al., 2022; their MS-COCO model), with deep prompts.

Parameter names and shapes equal those of the reference implementation (github baofff/U-ViT,
``libs/uvit_t2i.py``), so their MS-COCO checkpoints (U-ViT-S/2 and U-ViT-S/2 Deep), converted once to safetensors
(:func:`cdm.backbone.convert.import_uvit_t2i`), load with ``strict=True`` and give the same outputs. It is
:class:`cdm.backbone.uvit.UViT` with the label token replaced by a text context: ``context`` (B, num_clip_token,
clip_dim), the caption's token features from a text encoder (theirs: CLIP ViT-L/14's last hidden state, 77 x 768),
goes through one linear layer ``context_embed`` into the token width, and the sequence is ``[time, context
tokens, patches]``: ``extras = 1 + num_clip_token`` tokens before the patches, each with a learned position.
The network has no null condition: their classifier-free guidance feeds the encoding of the empty caption as the
unconditional context. The block stack, patch embedding, sinusoidal time embedding and ``(p1 p2 C)`` patch order
are U-ViT's (imported from :mod:`cdm.backbone.uvit`), and so are the deep prompts (``prompts``, ``prompt_gate``:
one prompt per block, the mid block counted, same semantics and shapes as there). Weights are initialised as in
the reference (truncated normal, position table included).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..io import config_from_dict
from .uvit import (Geometry, PatchEmbed, build_trunk, check_prompts, reference_init, run_blocks, timestep_embedding,
                   unpatchify)

__all__ = ["UViTT2I", "UViTT2IConfig"]


@dataclass(frozen=True)
class UViTT2IConfig(Geometry):
    img_size: int = 32  # side of the (square) model-space image (defaults: their mscoco_uvit_small, 4x32x32 latents)
    patch_size: int = 2  # side of a patch; img_size must be a multiple
    in_chans: int = 4  # image (latent) channels
    embed_dim: int = 512  # token width D
    depth: int = 12  # blocks in all: depth // 2 in, 1 mid, depth // 2 out
    num_heads: int = 8  # attention heads (embed_dim must be a multiple)
    mlp_ratio: float = 4.0  # MLP hidden width / D
    qkv_bias: bool = False  # the reference default: no bias on qkv
    mlp_time_embed: bool = False  # time token = MLP(sinusoid) instead of the bare sinusoid
    clip_dim: int = 768  # width of a context token (the text encoder's hidden size)
    num_clip_token: int = 77  # context tokens per caption (the text encoder's padded length)
    conv: bool = True  # 3x3 final_layer conv after unpatchify
    skip: bool = True  # long skip connections (skip_linear) in the out-blocks

    def __post_init__(self) -> None:
        self._check_geometry()
        if self.clip_dim < 1 or self.num_clip_token < 1:
            raise ValueError(f"clip_dim {self.clip_dim} and num_clip_token {self.num_clip_token} must be positive")

    @property
    def extras(self) -> int:
        """Tokens before the patches: time and the context tokens."""
        return 1 + self.num_clip_token

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> UViTT2IConfig:
        return config_from_dict(cls, d, "text-to-image U-ViT")


class UViTT2I(nn.Module):
    """The text-conditional U-ViT: ``forward(x, timesteps, context, prompts=None, prompt_gate=None) -> eps``.

    ``timesteps`` as the network was trained on (theirs: discrete n in 1..1000), possibly fractional; ``context``
    (B or 1, num_clip_token, clip_dim) text-encoder features (a batch of 1 is shared by every sample)."""

    def __init__(self, config: UViTT2IConfig | None = None, **overrides):
        super().__init__()
        c = config or UViTT2IConfig()
        if overrides:
            c = UViTT2IConfig.from_dict({**c.to_dict(), **overrides})
        self.config = c
        d = c.embed_dim
        self.patch_embed = PatchEmbed(c.patch_size, c.in_chans, d)
        self.time_embed = (
            nn.Sequential(nn.Linear(d, 4 * d), nn.SiLU(), nn.Linear(4 * d, d)) if c.mlp_time_embed else nn.Identity()
        )
        self.context_embed = nn.Linear(c.clip_dim, d)
        self.pos_embed = nn.Parameter(torch.zeros(1, c.extras + c.num_patches, d))
        build_trunk(self, c)
        reference_init(self)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    @property
    def n_blocks(self) -> int:
        return self.config.n_blocks

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                prompts: torch.Tensor | None = None, prompt_gate: torch.Tensor | None = None) -> torch.Tensor:
        c = self.config
        if x.ndim != 4 or x.shape[1:] != (c.in_chans, c.img_size, c.img_size):
            raise ValueError(f"expected input (B, {c.in_chans}, {c.img_size}, {c.img_size}), got {tuple(x.shape)}")
        b = x.shape[0]
        if (not torch.is_tensor(context) or context.ndim != 3 or context.shape[1:] != (c.num_clip_token, c.clip_dim)
                or context.shape[0] not in (1, b)):
            got = tuple(context.shape) if torch.is_tensor(context) else type(context).__name__
            raise ValueError(f"context must be (B or 1, {c.num_clip_token}, {c.clip_dim}) text tokens, got {got}")
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(b)
        check_prompts(c, b, prompts, prompt_gate)
        h = self.patch_embed(x)
        time_token = self.time_embed(timestep_embedding(timesteps, c.embed_dim).to(h.dtype))
        context_tokens = self.context_embed(context.to(h.dtype)).expand(b, -1, -1)
        h = torch.cat([time_token.unsqueeze(1), context_tokens, h], dim=1) + self.pos_embed
        h, _ = run_blocks(self, h, prompts, prompt_gate)
        h = self.decoder_pred(self.norm(h))[:, c.extras:]
        return self.final_layer(unpatchify(h, c.in_chans))
