"""The noise process: a discrete variance-preserving (DDPM) schedule with epsilon prediction.

``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps`` for integer ``t`` in ``0..T-1``. The betas come from
diffusers (one source of truth for the schedule, the DDIM and the DPM-Solver++ updates). Two schedules are
registered:

- ``cosine``: Nichol & Dhariwal's squared-cosine ``abar`` (diffusers ``squaredcos_cap_v2``). cdm's default:
  measured here to train the small pixel-space U-ViT well.
- ``linear``: the Stable-Diffusion "scaled linear" betas (sqrt-linear from 0.00085 to 0.012) that U-ViT's
  latent-space checkpoints were trained with; pick it to run such a checkpoint.

This module imports no model: schedules never know what denoises.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import cached_property

import torch

__all__ = ["SCHEDULES", "NoiseSchedule"]

# name -> diffusers ``beta_schedule`` and extra kwargs
SCHEDULES: dict[str, dict] = {
    "cosine": {"beta_schedule": "squaredcos_cap_v2"},
    "linear": {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
}


@dataclass(frozen=True)
class NoiseSchedule:
    name: str = "cosine"  # a key of SCHEDULES
    num_train_timesteps: int = 1000  # T

    def __post_init__(self) -> None:
        if self.name not in SCHEDULES:
            raise ValueError(f"unknown noise schedule {self.name!r}; known: {', '.join(SCHEDULES)}")

    def to_dict(self) -> dict:
        return asdict(self)

    def scheduler_kwargs(self) -> dict:
        return {"num_train_timesteps": self.num_train_timesteps, "prediction_type": "epsilon", **SCHEDULES[self.name]}

    @cached_property
    def alphas_cumprod(self) -> torch.Tensor:
        """abar_t for t = 0..T-1 (float64)."""
        from diffusers import DDPMScheduler

        return DDPMScheduler(**self.scheduler_kwargs()).alphas_cumprod.double()

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Sample ``x_t`` from ``q(x_t | x_0)`` given the noise."""
        abar = self.alphas_cumprod.to(x0.device)[t].to(x0.dtype).view(-1, *([1] * (x0.ndim - 1)))
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise
