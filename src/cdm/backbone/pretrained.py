"""A frozen, pretrained backbone bundle: the U-ViT, its noise schedule and its codec (pixels or latents).

On disk (``save_pretrained`` / ``from_pretrained``)::

    config.json        {"kind": "cdm-backbone", "model": UViTConfig, "schedule": NoiseSchedule,
                        "codec": PixelCodec | {"kind": "latent", "autoencoder": REF, "autoencoder_hash": ...}}
    model.safetensors  the U-ViT state dict (EMA weights), names as in baofff/U-ViT
    training.json      optional record: command, commit, seed, steps, wall time, machine, data hashes
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from ..errors import WeightsError
from ..io import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    atomic_write_json,
    load_state_dict,
    load_strict,
    read_json,
    save_state_dict,
    state_dict_sha256,
)
from ..sampling import NoiseSchedule, classifier_free_guidance
from ..shipped import path_of, ref_of, shipped
from .latents import LatentCodec
from .pixels import PixelCodec, codec_from_dict
from .uvit import UViT, UViTConfig

__all__ = ["DEFAULT_BACKBONE", "Backbone"]

KIND = "cdm-backbone"
DEFAULT_BACKBONE = shipped("backbone")  # package data: found in an editable checkout and an installed wheel alike


@dataclass
class Backbone:
    """The frozen denoiser every compartment shares. ``eps(x, t, y=..., prompts=...)`` is a Denoiser."""

    net: UViT
    schedule: NoiseSchedule = field(default_factory=NoiseSchedule)
    codec: PixelCodec | LatentCodec = field(default_factory=PixelCodec)
    record: dict | None = None
    ref: str | None = None  # where it was loaded from (``shipped:<name>`` or a path); stores record it

    def __post_init__(self) -> None:
        c, cfg = self.codec, self.net.config
        if (c.model_size, c.model_channels) != (cfg.img_size, cfg.in_chans):
            raise WeightsError(f"the codec gives {c.model_channels}x{c.model_size}x{c.model_size} tensors, the U-ViT "
                               f"takes {cfg.in_chans}x{cfg.img_size}x{cfg.img_size}")

    @property
    def config(self) -> UViTConfig:
        return self.net.config

    @cached_property
    def hash(self) -> str:
        """sha256 of the weights: compartments record it and are refused on any other backbone. A latent backbone's
        hash also covers its autoencoder's (sha256 of ``"<weights hash>+autoencoder:<autoencoder hash>"``): the same
        U-ViT over another autoencoder is another backbone, so stores and compartments refuse the mismatch."""
        h = state_dict_sha256(self.net.state_dict())
        if self.codec.hash is None:
            return h
        return hashlib.sha256(f"{h}+autoencoder:{self.codec.hash}".encode()).hexdigest()

    @property
    def latent(self) -> bool:
        """Whether it works in an autoencoder's latent space."""
        return self.codec.kind == "latent"

    @property
    def device(self) -> torch.device:
        """Where the transformer runs, and hence where everything cdm builds around it runs: compartment and head
        training (prompts, adapters, optimisers, batches, noise), sampling (solvers, composed denoisers,
        weightings) and attribution all take their device from here."""
        return self.net.pos_embed.device

    def to(self, device: str | torch.device) -> Backbone:
        """Move the transformer (and a latent backbone's autoencoder) to ``device`` (e.g. ``"cuda"``); training,
        sampling, weightings and attribution then run there too (see :attr:`device`). Random draws are still made
        on the CPU, from the same seeded generators, and moved, so only the arithmetic differs from the CPU, which
        stays the bit-exact reference (forgetting). A caller's tensors elsewhere are still accepted: the U-ViT
        moves inputs and outputs (``UViT.forward``). The weights' hash is taken first, on the CPU; saved weights
        are always written from the CPU."""
        _ = self.hash
        self.net.to(device)
        if self.latent:
            self.codec.autoencoder.to(device)
        return self

    def freeze(self) -> Backbone:
        self.net.eval().requires_grad_(False)
        return self

    def eps(self, x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        return self.net(x, t, **cond)

    def guided(self, scale: float):
        """The denoiser with classifier-free guidance against the null class."""
        null = self.config.null_class
        if scale != 1.0 and null is None:
            raise ValueError("this backbone has no null class, so it cannot use classifier-free guidance")
        return classifier_free_guidance(self.eps, scale, {"y": null}) if scale != 1.0 else self.eps

    # -- persistence ---------------------------------------------------------------------------------
    def save_pretrained(self, path: str | Path, record: dict | None = None) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_state_dict(path / WEIGHTS_NAME, self.net.state_dict())
        atomic_write_json(path / CONFIG_NAME, {"kind": KIND, "model": self.config.to_dict(),
                                               "schedule": self.schedule.to_dict(), "codec": self.codec.to_dict()})
        if record is not None:
            atomic_write_json(path / "training.json", record)

    @classmethod
    def from_pretrained(cls, path: str | Path = DEFAULT_BACKBONE, autoencoder=None) -> Backbone:
        """Load a bundle directory, or a shipped one by ref (``shipped:backbone-glyphs``). A latent backbone loads
        the autoencoder its config names, or ``autoencoder`` (a folder or an Autoencoder) if given: either way
        its hash must be the one recorded."""
        path = path_of(path)
        if path.is_file():
            load_state_dict(path)  # refuses pickles and non-safetensors files with a clear message
            raise WeightsError(f"{path}: give the backbone directory (config.json + {WEIGHTS_NAME}), not a file")
        if not path.is_dir():
            raise WeightsError(f"{path}: no such backbone directory")
        cfg = read_json(path / CONFIG_NAME)
        if cfg.get("kind") != KIND:
            raise WeightsError(f"{path / CONFIG_NAME}: kind is {cfg.get('kind')!r}, expected {KIND!r}")
        try:
            net = UViT(UViTConfig.from_dict(cfg["model"]))
            schedule = NoiseSchedule(**cfg.get("schedule", {}))
            codec = codec_from_dict(cfg.get("codec", {}), autoencoder)
        except WeightsError as e:
            raise WeightsError(f"{path}: {e}") from None
        except (KeyError, TypeError, ValueError) as e:
            raise WeightsError(f"{path / CONFIG_NAME}: invalid config ({e})") from None
        load_strict(net, load_state_dict(path / WEIGHTS_NAME), path / WEIGHTS_NAME)
        rec = path / "training.json"
        return cls(net, schedule, codec, read_json(rec) if rec.exists() else None, ref=ref_of(path)).freeze()
