"""A frozen, pretrained backbone bundle: the U-ViT, its noise schedule and its pixel codec.

On disk (``save_pretrained`` / ``from_pretrained``)::

    config.json        {"kind": "cdm-backbone", "model": UViTConfig, "schedule": NoiseSchedule, "codec": PixelCodec}
    model.safetensors  the U-ViT state dict (EMA weights), names as in baofff/U-ViT
    training.json      optional record: command, commit, seed, steps, wall time, machine, data hashes
"""

from __future__ import annotations

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
from .pixels import PixelCodec
from .uvit import UViT, UViTConfig

__all__ = ["DEFAULT_BACKBONE", "Backbone"]

KIND = "cdm-backbone"
DEFAULT_BACKBONE = shipped("backbone")  # package data: found in an editable checkout and an installed wheel alike


@dataclass
class Backbone:
    """The frozen denoiser every compartment shares. ``eps(x, t, y=..., prompts=...)`` is a Denoiser."""

    net: UViT
    schedule: NoiseSchedule = field(default_factory=NoiseSchedule)
    codec: PixelCodec = field(default_factory=PixelCodec)
    record: dict | None = None
    ref: str | None = None  # where it was loaded from (``shipped:<name>`` or a path); stores record it

    def __post_init__(self) -> None:
        if self.codec.model_size != self.net.config.img_size:
            raise WeightsError(f"codec model_size {self.codec.model_size} != U-ViT img_size {self.net.config.img_size}")

    @property
    def config(self) -> UViTConfig:
        return self.net.config

    @cached_property
    def hash(self) -> str:
        """sha256 of the weights: compartments record it and are refused on any other backbone."""
        return state_dict_sha256(self.net.state_dict())

    @property
    def device(self) -> torch.device:
        return self.net.pos_embed.device

    def to(self, device: str | torch.device) -> Backbone:
        """Run the transformer on ``device`` (e.g. ``"cuda"``); callers keep their tensors where they are (the
        U-ViT moves inputs and outputs, see ``UViT.forward``). The weights' hash is taken first, on the CPU."""
        _ = self.hash
        self.net.to(device)
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
    def from_pretrained(cls, path: str | Path = DEFAULT_BACKBONE) -> Backbone:
        """Load a bundle directory, or a shipped one by ref (``shipped:backbone-glyphs``)."""
        path = path_of(path)
        if path.is_file():
            load_state_dict(path)  # refuses pickles and non-safetensors files with a clear message
            raise WeightsError(f"{path}: give the backbone directory (config.json + {WEIGHTS_NAME}), not a file")
        if not path.is_dir():
            raise WeightsError(f"{path}: no such backbone directory")
        cfg = read_json(path / CONFIG_NAME)
        if cfg.get("kind") != KIND:
            raise WeightsError(f"{path / CONFIG_NAME}: kind is {cfg.get('kind')!r}, expected {KIND!r}")
        codec_cfg = dict(cfg.get("codec", {}))
        if codec_cfg.get("kind", "pixels") != "pixels":
            raise WeightsError(f"{path}: a {codec_cfg['kind']} backbone (it works on an autoencoder's latents, "
                               f"{codec_cfg.get('autoencoder', 'not named')}); latent mode is not built yet")
        codec_cfg.pop("kind", None)
        try:
            net = UViT(UViTConfig.from_dict(cfg["model"]))
            schedule = NoiseSchedule(**cfg.get("schedule", {}))
            codec = PixelCodec(**codec_cfg)
        except (KeyError, TypeError, ValueError) as e:
            raise WeightsError(f"{path / CONFIG_NAME}: invalid config ({e})") from None
        load_strict(net, load_state_dict(path / WEIGHTS_NAME), path / WEIGHTS_NAME)
        rec = path / "training.json"
        return cls(net, schedule, codec, read_json(rec) if rec.exists() else None, ref=ref_of(path)).freeze()
