"""Between stored images (uint8, 28x28, white ink on black) and the model's space.

The shipped backbone works on 14x14 images: 2x2 average pooling in, bilinear upsampling out. Measured here,
a patch-2 U-ViT at 14x14 trains to recognisable digits in minutes on a CPU, while patch 4 at 28x28 stayed at
chance after 1k steps and patch 2 at 28x28 is six times slower. :class:`~cdm.backbone.LatentCodec` (latent mode)
has the same contract; :func:`codec_from_dict` reads either from a backbone's config.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..data.spec import ImageSpec
from ..errors import DataError

__all__ = ["PixelCodec", "codec_from_dict"]


@dataclass(frozen=True)
class PixelCodec:
    kind = "pixels"  # a class attribute: not a field, not in the config

    data_size: int = 28  # side of stored images
    model_size: int = 14  # side of the images the denoiser sees (data_size must be a multiple)
    channels: int = 1  # 1: grey, stored (N, H, W); 3: RGB, stored (N, H, W, 3)

    def __post_init__(self) -> None:
        if self.data_size % self.model_size:
            raise ValueError(f"data_size {self.data_size} is not a multiple of model_size {self.model_size}")
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 (grey) or 3 (RGB), got {self.channels}")

    def to_dict(self) -> dict:
        d = asdict(self)
        if self.channels == 1:  # grey codecs keep the config they always had
            del d["channels"]
        return d

    @property
    def model_channels(self) -> int:
        """Channels of the tensors the denoiser sees (pixels: the image's)."""
        return self.channels

    @property
    def hash(self) -> None:
        """Pixels depend on nothing but the images (a latent codec: its autoencoder's hash)."""
        return None

    @property
    def spec(self) -> ImageSpec:
        """The stored images it takes and gives back."""
        return ImageSpec(self.data_size, self.data_size, self.channels)

    @property
    def x0_range(self) -> float:
        """Model-space values lie in [-r, r] (pixels: r = 1), so a solver clips its x_0 prediction there."""
        return 1.0

    def encode(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 (N, H, W) -> float (N, 1, m, m) in [-1, 1]; RGB: uint8 (N, H, W, 3) -> float (N, 3, m, m)."""
        x = torch.as_tensor(np.array(images, copy=True))
        shape = (self.data_size, self.data_size) + ((self.channels,) if self.channels > 1 else ())
        if x.dtype != torch.uint8 or tuple(x.shape[1:]) != shape:
            raise DataError(f"expected uint8 images (N, {', '.join(map(str, shape))}), got {x.dtype} {tuple(x.shape)}")
        x = x.float().unsqueeze(1) / 127.5 - 1.0 if self.channels == 1 else x.float().permute(0, 3, 1, 2) / 127.5 - 1.0
        k = self.data_size // self.model_size
        return F.avg_pool2d(x, k) if k > 1 else x

    def decode(self, x: torch.Tensor) -> np.ndarray:
        """float (N, 1, m, m) in [-1, 1] -> uint8 (N, H, W); RGB: float (N, 3, m, m) -> uint8 (N, H, W, 3)."""
        x = x.detach().float().cpu()
        if self.model_size != self.data_size:
            x = F.interpolate(x, size=(self.data_size, self.data_size), mode="bilinear", align_corners=False)
        x = x[:, 0] if self.channels == 1 else x.permute(0, 2, 3, 1).contiguous()
        return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()


def codec_from_dict(d: dict, autoencoder=None):
    """The codec a backbone config names: ``{"kind": "pixels", ...}`` (the default) or ``{"kind": "latent", ...}``
    (``autoencoder``: a folder or :class:`~cdm.autoencoder.Autoencoder` overriding the recorded one)."""
    d = dict(d)
    kind = d.pop("kind", "pixels")
    if kind == "pixels":
        if autoencoder is not None:
            raise ValueError("a pixel backbone takes no autoencoder")
        return PixelCodec(**d)
    if kind == "latent":
        from .latents import LatentCodec

        return LatentCodec.from_dict(d, autoencoder)
    raise ValueError(f"unknown codec kind {kind!r} (pixels, latent)")
