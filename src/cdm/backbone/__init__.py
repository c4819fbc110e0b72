"""The frozen denoiser: U-ViT with deep prompts, its codec (pixels, or an autoencoder's latents), the pretrained
bundle and the baofff/U-ViT checkpoint import."""

from .convert import UVIT_RELEASES, import_uvit
from .latents import LatentCodec
from .pixels import PixelCodec, codec_from_dict
from .pretrained import DEFAULT_BACKBONE, Backbone
from .uvit import UViT, UViTConfig, patchify, timestep_embedding, unpatchify

Codec = PixelCodec | LatentCodec  # what a backbone's ``codec`` is: stored images <-> the denoiser's space

__all__ = ["DEFAULT_BACKBONE", "UVIT_RELEASES", "Backbone", "Codec", "LatentCodec", "PixelCodec", "UViT", "UViTConfig",
           "codec_from_dict", "import_uvit", "patchify", "timestep_embedding", "unpatchify"]
