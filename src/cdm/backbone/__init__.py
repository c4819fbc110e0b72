"""The frozen denoiser: U-ViT with deep prompts, its pixel codec, the pretrained bundle and the baofff/U-ViT
checkpoint import."""

from .convert import UVIT_RELEASES, import_uvit
from .pixels import PixelCodec
from .pretrained import DEFAULT_BACKBONE, Backbone
from .uvit import UViT, UViTConfig, patchify, timestep_embedding, unpatchify

__all__ = ["DEFAULT_BACKBONE", "UVIT_RELEASES", "Backbone", "PixelCodec", "UViT", "UViTConfig", "import_uvit",
           "patchify", "timestep_embedding", "unpatchify"]
