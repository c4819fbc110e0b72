"""Latent mode: between stored images and an autoencoder's latent space (the paper's setting, and baofff's
ImageNet 256/512 U-ViTs on Stable Diffusion's latents).

``LatentCodec`` has :class:`~cdm.backbone.PixelCodec`'s contract (``spec``, ``model_size``, ``model_channels``,
``x0_range``, ``encode``, ``decode``, ``to_dict``), so every caller of a backbone's codec works in latent mode
unchanged: compartments, the router heads, the noisy classifier, the Itô density estimator and attribution all
live in latent space (x_t is a noisy latent there), and only the judge and the user see decoded images.

Grey stored images (N, H, W) go through an RGB autoencoder as three equal channels and come back as their mean.
Encoding is per image (:meth:`~cdm.autoencoder.Autoencoder.encode`), so a cached latent is bit-identical to a
freshly computed one; stores cache them per source (``operations.model_inputs``).
"""

from __future__ import annotations

import numpy as np
import torch

from ..autoencoder import Autoencoder
from ..data.spec import ImageSpec
from ..errors import DataError, WeightsError

__all__ = ["LatentCodec"]


class LatentCodec:
    """``x0_range``: the box ``|z| <= r`` the latents lie in, recorded by pretraining (1.5x the largest |z| of its
    latents), so a solver can clip its x_0 prediction there as it clips pixels to [-1, 1]. It matters at the
    first step under the cosine schedule (abar(T-1) = 2.4e-9): there ``x0 = (x - sqrt(1 - abar) eps) /
    sqrt(abar)`` multiplies the network's error ~2e4-fold, and unclipped latents were measured to explode (std
    ~700 after 50 ancestral steps; clipped at 3 or 5: std 0.96, the data's). None (e.g. an imported model, whose
    SD schedule keeps abar(T-1) = 4.7e-3): no clipping."""

    kind = "latent"

    def __init__(self, autoencoder: Autoencoder, *, data_size: int, channels: int = 3,
                 x0_range: float | None = None):
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 (grey) or 3 (RGB), got {channels}")
        if autoencoder.channels != 3 and autoencoder.channels != channels:
            raise ValueError(f"the autoencoder takes {autoencoder.channels} channels, the data has {channels}")
        if data_size % autoencoder.factor:
            raise ValueError(f"data_size {data_size} is not a multiple of the autoencoder's factor "
                             f"{autoencoder.factor}")
        if x0_range is not None and not x0_range > 0:
            raise ValueError(f"x0_range must be positive, got {x0_range}")
        self.autoencoder = autoencoder
        self.data_size = int(data_size)
        self.channels = int(channels)
        self.x0_range = None if x0_range is None else float(x0_range)

    def __repr__(self) -> str:
        return f"LatentCodec({self.spec} <-> {self.model_channels}x{self.model_size}x{self.model_size}, " \
               f"{self.autoencoder!r})"

    @property
    def model_size(self) -> int:
        return self.data_size // self.autoencoder.factor

    @property
    def model_channels(self) -> int:
        return self.autoencoder.latent_channels

    @property
    def hash(self) -> str:
        """What a cached latent depends on: the autoencoder's hash."""
        return self.autoencoder.hash

    @property
    def spec(self) -> ImageSpec:
        return ImageSpec(self.data_size, self.data_size, self.channels)

    def to_dict(self) -> dict:
        d = {"kind": self.kind, "autoencoder": self.autoencoder.ref, "autoencoder_hash": self.autoencoder.hash,
             "data_size": self.data_size, "channels": self.channels}
        return d if self.x0_range is None else {**d, "x0_range": self.x0_range}

    @classmethod
    def from_dict(cls, d: dict, autoencoder: Autoencoder | str | None = None) -> LatentCodec:
        """From a backbone config's codec entry. ``autoencoder``: one to use instead of the recorded ref (a user's
        copy elsewhere); its hash must be the recorded one."""
        d = dict(d)
        d.pop("kind", None)
        want = d.pop("autoencoder_hash", None)
        ref = d.pop("autoencoder", None)
        if autoencoder is None:
            if not isinstance(ref, str) or want is None:
                raise WeightsError(f"a latent backbone needs its autoencoder ({ref or 'not named'}): give its folder "
                                   "(--autoencoder DIR, Backbone.from_pretrained(..., autoencoder=DIR))")
            autoencoder = ref
        ae = autoencoder if isinstance(autoencoder, Autoencoder) else Autoencoder.from_pretrained(autoencoder)
        if want is not None and ae.hash != want:
            raise WeightsError(f"autoencoder {ae.ref} ({ae.hash[:12]}) is not the one this backbone was trained with "
                               f"({want[:12]}); give that one")
        unknown = sorted(set(d) - {"data_size", "channels", "image_size", "weights", "x0_range"})
        if unknown:
            raise WeightsError(f"latent codec: unknown fields {', '.join(unknown)}")
        size = d.get("data_size", d.get("image_size"))
        if size is None:
            raise WeightsError("latent codec: no data_size (the side of the stored images)")
        try:
            return cls(ae, data_size=int(size), channels=int(d.get("channels", 3)), x0_range=d.get("x0_range"))
        except ValueError as e:
            raise WeightsError(f"latent codec: {e}") from None

    def encode(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 images -> scaled latents (N, model_channels, m, m), one image at a time."""
        x = images if torch.is_tensor(images) else torch.from_numpy(np.array(images, copy=True))
        shape = self.spec.shape
        if x.dtype != torch.uint8 or tuple(x.shape[1:]) != shape:
            raise DataError(f"expected uint8 images (N, {', '.join(map(str, shape))}), got {x.dtype} {tuple(x.shape)}")
        return self.autoencoder.encode_images(x)

    def decode(self, z: torch.Tensor) -> np.ndarray:
        """Latents -> uint8 images in the stored format."""
        return self.autoencoder.decode_images(z, grey=self.channels == 1)
