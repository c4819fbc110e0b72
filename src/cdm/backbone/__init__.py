"""The frozen denoiser: U-ViT with deep prompts, its pixel codec and the pretrained bundle."""

from .pixels import PixelCodec
from .pretrained import DEFAULT_BACKBONE, Backbone
from .uvit import UViT, UViTConfig, patchify, timestep_embedding, unpatchify

__all__ = ["DEFAULT_BACKBONE", "Backbone", "PixelCodec", "UViT", "UViTConfig", "patchify",
           "timestep_embedding", "unpatchify"]
