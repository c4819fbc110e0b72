"""A frozen image autoencoder for latent mode: ``encode(x) -> z``, ``decode(z) -> x``, a scale, a hash.

One class, :class:`Autoencoder`, wraps a diffusers ``AutoencoderKL`` (the KL autoencoder of latent diffusion and
Stable Diffusion). It serves both kinds a user meets:

* a user's own, e.g. Stable Diffusion's VAE kept in a local folder (``config.json`` +
  ``diffusion_pytorch_model.safetensors``, as ``AutoencoderKL.save_pretrained`` writes it);
* cdm's own small one (``shipped:autoencoder-emoji``), trained on public data only by ``cdm train-autoencoder``
  (:mod:`cdm.autoencoder.train`), saved in the same layout plus ``training.json``.

Loading reads the config, builds the module and loads the safetensors weights with cdm's own strict loader: no
pickle (a folder with only ``.bin`` weights is refused), no network. Latents the diffusion model sees are
``(mode(q(z|x)) - shift) * scale`` with ``scale``/``shift`` from the config (``scaling_factor``, ``shift_factor``;
SD: 0.18215, none). Encoding takes the posterior's mode, one image at a time: a sample's latent depends on that
image only (never on the batch it came in), which keeps exact forgetting bit-identical.

``hash``: sha256 of the weights' hash and the scale and shift; backbones record it, stores and cached latents
are keyed by it.
"""

from __future__ import annotations

import hashlib
import json
import os
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from ..errors import WeightsError
from ..io import CONFIG_NAME, atomic_write_json, load_state_dict, load_strict, read_json, save_state_dict
from ..io import state_dict_sha256
from ..shipped import path_of, ref_of

__all__ = ["AE_WEIGHTS_NAME", "Autoencoder", "small_autoencoder"]

AE_WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"  # diffusers' name, so either library reads the folder
_CLASS = "AutoencoderKL"


def _diffusers_kl():
    from diffusers import AutoencoderKL  # a dependency of cdm already (schedules); imported on use: it is slow

    return AutoencoderKL


def small_autoencoder(*, channels: int = 3, latent_channels: int = 4, widths: tuple[int, ...] = (16, 32, 64),
                      groups: int = 8) -> torch.nn.Module:
    """cdm's small KL autoencoder: downsampling factor ``2 ** (len(widths) - 1)`` (4 for the default), one
    residual block per level, attention in the middle. Measured here on 32x32 RGB: (16, 32, 64) trains at 0.33 s
    per batch of 32 on 2 CPU cores; (32, 64, 128) at 0.92 s."""
    n = len(widths)
    return _diffusers_kl()(in_channels=channels, out_channels=channels, down_block_types=("DownEncoderBlock2D",) * n,
                           up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=tuple(widths),
                           layers_per_block=1, latent_channels=latent_channels, norm_num_groups=groups,
                           sample_size=32, scaling_factor=1.0)


class Autoencoder:
    """A frozen ``AutoencoderKL`` with cdm's contract. Images are float (N, C, H, W) in [-1, 1]; H and W must be
    multiples of :attr:`factor`."""

    def __init__(self, net: torch.nn.Module, *, ref: str | None = None, record: dict | None = None):
        self.net = net.eval().requires_grad_(False)
        self.ref = ref  # where it was loaded from (a path or ``shipped:<name>``); backbones record it
        self.record = record

    # -- what it is ---------------------------------------------------------------------------------------
    @property
    def config(self) -> dict:
        return dict(self.net.config)

    @property
    def channels(self) -> int:
        """Image channels it takes (3 for SD's and cdm's)."""
        return int(self.net.config.in_channels)

    @property
    def latent_channels(self) -> int:
        return int(self.net.config.latent_channels)

    @property
    def factor(self) -> int:
        """Image side / latent side."""
        return 2 ** (len(self.net.config.block_out_channels) - 1)

    @property
    def scale(self) -> float:
        return float(self.net.config.scaling_factor)

    @property
    def shift(self) -> float:
        s = self.net.config.shift_factor
        return 0.0 if s is None else float(s)

    @cached_property
    def hash(self) -> str:
        """sha256 over the weights' hash, the scale and the shift: what the latents depend on."""
        text = json.dumps({"weights": state_dict_sha256(self.net.state_dict()), "scale": self.scale,
                           "shift": self.shift}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    def __repr__(self) -> str:
        return (f"Autoencoder({self.ref or 'in memory'}, f={self.factor}, {self.channels}->{self.latent_channels} "
                f"channels, scale {self.scale:g}, {self.hash[:12]})")

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def to(self, device: str | torch.device) -> Autoencoder:
        _ = self.hash
        self.net.to(device)
        return self

    # -- the two maps -------------------------------------------------------------------------------------
    def _check(self, x: torch.Tensor, what: str, channels: int, side_factor: int) -> None:
        if x.ndim != 4 or x.shape[1] != channels or x.shape[2] % side_factor or x.shape[3] % side_factor:
            raise ValueError(f"autoencoder {what}: expected (N, {channels}, H, W) with H, W multiples of "
                             f"{side_factor}, got {tuple(x.shape)}")

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images (N, C, H, W) in [-1, 1] -> scaled latents (N, latent_channels, H / f, W / f), one image at a
        time (a latent never depends on its batch)."""
        self._check(x, "encode", self.channels, self.factor)
        home = x.device
        out = [self.net.encode(x[i:i + 1].to(self.device, torch.float32)).latent_dist.mode() for i in range(len(x))]
        z = torch.cat(out) if out else x.new_zeros((0, self.latent_channels, x.shape[2] // self.factor,
                                                     x.shape[3] // self.factor))
        return ((z - self.shift) * self.scale).to(home)

    @torch.no_grad()
    def decode(self, z: torch.Tensor, batch: int = 64) -> torch.Tensor:
        """Scaled latents -> images (N, C, H, W), about [-1, 1] (not clipped)."""
        self._check(z, "decode", self.latent_channels, 1)
        home = z.device
        out = [self.net.decode((z[i:i + batch].to(self.device, torch.float32) / self.scale) + self.shift).sample
               for i in range(0, len(z), batch)]
        return (torch.cat(out) if out else z.new_zeros((0, self.channels, z.shape[2] * self.factor,
                                                        z.shape[3] * self.factor))).to(home)

    # -- stored images (uint8) <-> latents ---------------------------------------------------------------
    def encode_images(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 images, (N, H, W) grey (fed as that many equal channels) or (N, H, W, C) -> scaled latents."""
        x = images if torch.is_tensor(images) else torch.from_numpy(np.array(images, copy=True))
        x = x.float() / 127.5 - 1.0
        x = x.unsqueeze(1).expand(-1, self.channels, -1, -1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
        return self.encode(x)

    def decode_images(self, z: torch.Tensor, *, grey: bool) -> np.ndarray:
        """Scaled latents -> uint8 images: (N, H, W) grey (the mean of the channels) or (N, H, W, C)."""
        x = self.decode(z.detach().float()).cpu()
        x = x.mean(1) if grey else x.permute(0, 2, 3, 1).contiguous()
        return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()

    # -- persistence --------------------------------------------------------------------------------------
    def save_pretrained(self, path: str | Path, record: dict | None = None) -> None:
        """diffusers' layout (``config.json`` + ``diffusion_pytorch_model.safetensors``) and ``training.json``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_state_dict(path / AE_WEIGHTS_NAME, self.net.state_dict())
        cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.net.config.items()
               if not k.startswith("_")}
        atomic_write_json(path / CONFIG_NAME, {"_class_name": _CLASS, **cfg})
        if record is not None:
            atomic_write_json(path / "training.json", record)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> Autoencoder:
        """Load an ``AutoencoderKL`` folder (a user's, e.g. Stable Diffusion's VAE, or ``shipped:...``)."""
        path = path_of(path)
        if not path.is_dir():
            raise WeightsError(f"{path}: no such autoencoder directory (config.json + {AE_WEIGHTS_NAME})")
        cfg = read_json(path / CONFIG_NAME)
        if cfg.get("_class_name") != _CLASS:
            raise WeightsError(f"{path / CONFIG_NAME}: _class_name is {cfg.get('_class_name')!r}; cdm reads "
                               f"diffusers {_CLASS} folders")
        weights = path / AE_WEIGHTS_NAME
        if not weights.is_file():
            pickles = sorted(p.name for p in path.glob("*.bin"))
            raise WeightsError(f"{path}: no {AE_WEIGHTS_NAME}" + (
                f" (only {', '.join(pickles)}: pickles, which cdm never loads; convert once with "
                "AutoencoderKL.from_pretrained(dir).save_pretrained(new_dir) in a trusted environment)"
                if pickles else ""))
        try:
            net = _diffusers_kl().from_config({k: v for k, v in cfg.items() if not k.startswith("_")})
        except (TypeError, ValueError) as e:
            raise WeightsError(f"{path / CONFIG_NAME}: invalid AutoencoderKL config ({e})") from None
        load_strict(net, load_state_dict(weights), weights)
        rec = path / "training.json"
        return cls(net, ref=ref_of(path), record=read_json(rec) if rec.exists() else None)
