"""The frozen denoiser: U-ViT with deep prompts, its codec (pixels, or an autoencoder's latents), the pretrained
bundle and the baofff/U-ViT checkpoint import (class-conditional and text-to-image)."""

from .convert import UVIT_RELEASES, UVIT_T2I_RELEASES, import_uvit, import_uvit_t2i, load_uvit_t2i
from .latents import LatentCodec
from .pixels import PixelCodec, codec_from_dict
from .pretrained import DEFAULT_BACKBONE, Backbone
from .uvit import UViT, UViTConfig, patchify, timestep_embedding, unpatchify
from .uvit_t2i import UViTT2I, UViTT2IConfig

Codec = PixelCodec | LatentCodec  # what a backbone's ``codec`` is: stored images <-> the denoiser's space

__all__ = ["DEFAULT_BACKBONE", "UVIT_RELEASES", "UVIT_T2I_RELEASES", "Backbone", "Codec", "LatentCodec", "PixelCodec",
           "UViT", "UViTConfig", "UViTT2I", "UViTT2IConfig", "codec_from_dict", "import_uvit", "import_uvit_t2i",
           "load_uvit_t2i", "patchify", "timestep_embedding", "unpatchify"]
