"""The noise process: a discrete variance-preserving (DDPM) schedule with epsilon prediction.

``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps`` for integer ``t`` in ``0..T-1``; the denoiser is fed that
integer ``t``. The betas come from diffusers (one source of truth for the schedule, the DDIM and the DPM-Solver++
updates). Registered schedules:

- ``cosine``: Nichol & Dhariwal's squared-cosine ``abar`` (diffusers ``squaredcos_cap_v2``). cdm's default:
  measured here to train the small pixel-space U-ViT well.
- ``linear``: the Stable-Diffusion "scaled linear" betas (sqrt-linear from 0.00085 to 0.012) that U-ViT's
  *discrete-time* latent checkpoints were trained with (baofff/U-ViT ``train_ldm_discrete.py``: ImageNet
  256/512 U-ViT-H). Note that those networks were fed ``n = t + 1`` (their ``n`` runs over 1..1000 for the
  ``abar`` that is ``alphas_cumprod[t]`` here), so feeding them ``t`` is off by one step of 1000.
- ``ddpm_linear``: Ho et al.'s DDPM betas, linear from 1e-4 to 0.02 (diffusers ``linear``).
- ``vpsde``: the continuous VP-SDE of Song et al. (beta(s) = 0.1 + (20 - 0.1) s on s in [0, 1]) that U-ViT's
  pixel models (``train.py``: CIFAR-10, CelebA 64, ImageNet 64) and continuous-time latent models
  (``train_ldm.py``: ImageNet 256/512 U-ViT-L) were trained with, evaluated on the grid the network sees.
  Their network is fed ``s * 999`` (``sde.ScoreModel.predict``); here it is fed the integer ``t``, so integer
  ``t`` is continuous time ``s = t / 999`` (``t / (T - 1)`` in general) and
  ``abar_t = exp(-(0.1 s + (20 - 0.1) s^2 / 2))`` (their ``VPSDE.cum_alpha``; the mean coefficient
  ``sqrt(abar)`` has log ``-(20 - 0.1) s^2 / 4 - 0.1 s / 2``). What is exact and what is not:

  * exact: at every integer ``t`` the pair (network input, marginal ``q(x_t | x_0)``) is one the network was
    trained on (continuous ``s`` covers [0, 1]; ``t = 999`` is ``s = 1``), up to the float32 rounding of
    diffusers' ``cumprod`` of the betas (relative error of ``abar`` below 1e-6);
  * except at ``t = 0``: ``s = 0`` would give ``abar = 1`` (no noise at all, ``beta_0 = 0``), which makes every
    solver divide 0 by 0 when it visits ``t = 0`` (999 or 1000 steps). ``abar_0`` is instead ``abar(s = 1e-3)``,
    the smallest time at which their Euler-Maruyama sampler evaluates the network (fed 0.999 there, 0 here);
  * approximate: sampling. Their samplers integrate the SDE/ODE in continuous time (Euler-Maruyama on
    [1e-3, 1], DPM-Solver on [1e-4, 1]); cdm's DDIM/DPM-Solver++/ancestral solvers step between grid points,
    so samples follow the same model but not their exact trajectories.

This module imports no model: schedules never know what denoises.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import cached_property

import torch

__all__ = ["SCHEDULES", "VPSDE_BETA_MAX", "VPSDE_BETA_MIN", "VPSDE_S0", "NoiseSchedule", "vpsde_alphas_cumprod"]

VPSDE_BETA_MIN = 0.1  # baofff/U-ViT sde.VPSDE defaults (Song et al.'s VP-SDE)
VPSDE_BETA_MAX = 20.0
VPSDE_S0 = 1e-3  # the continuous time used for t = 0 (their sde.euler_maruyama's eps), so that abar_0 < 1


def vpsde_alphas_cumprod(num_train_timesteps: int, beta_min: float = VPSDE_BETA_MIN,
                         beta_max: float = VPSDE_BETA_MAX) -> torch.Tensor:
    """abar of the continuous VP-SDE at ``s = t / (T - 1)`` for t = 1..T-1 and at ``s = VPSDE_S0`` for t = 0
    (float64, the closed form ``exp(-(beta_min s + (beta_max - beta_min) s^2 / 2))``)."""
    s = torch.arange(num_train_timesteps, dtype=torch.float64) / (num_train_timesteps - 1)
    s[0] = VPSDE_S0
    return torch.exp(-(beta_min * s + (beta_max - beta_min) * s**2 / 2))


def _vpsde(num_train_timesteps: int) -> dict:
    abar = vpsde_alphas_cumprod(num_train_timesteps)
    betas = 1 - abar / torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])  # cumprod(1 - betas) = abar
    return {"trained_betas": betas.tolist()}


# name -> diffusers DDPMScheduler kwargs (beyond T and the prediction type), or a function of T giving them
SCHEDULES: dict[str, dict | Callable[[int], dict]] = {
    "cosine": {"beta_schedule": "squaredcos_cap_v2"},
    "linear": {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
    "ddpm_linear": {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02},
    "vpsde": _vpsde,
}


@dataclass(frozen=True)
class NoiseSchedule:
    name: str = "cosine"  # a key of SCHEDULES
    num_train_timesteps: int = 1000  # T

    def __post_init__(self) -> None:
        if self.name not in SCHEDULES:
            raise ValueError(f"unknown noise schedule {self.name!r}; known: {', '.join(SCHEDULES)}")
        if self.num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be >= 2, got {self.num_train_timesteps}")

    def to_dict(self) -> dict:
        return asdict(self)

    def scheduler_kwargs(self) -> dict:
        extra = SCHEDULES[self.name]
        extra = extra(self.num_train_timesteps) if callable(extra) else extra
        return {"num_train_timesteps": self.num_train_timesteps, "prediction_type": "epsilon", **extra}

    @cached_property
    def alphas_cumprod(self) -> torch.Tensor:
        """abar_t for t = 0..T-1 (float64)."""
        from diffusers import DDPMScheduler

        return DDPMScheduler(**self.scheduler_kwargs()).alphas_cumprod.double()

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Sample ``x_t`` from ``q(x_t | x_0)`` given the noise."""
        abar = self.alphas_cumprod.to(x0.device)[t].to(x0.dtype).view(-1, *([1] * (x0.ndim - 1)))
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise
