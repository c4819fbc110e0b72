"""The denoising loss, as a small callable (EDM's ``loss.py`` style).

Noise and timesteps are drawn *outside* the model and passed in, so the same function serves plain training,
prompt tuning and DP-SGD (where Opacus needs the model's forward to take the batch only).
"""

from __future__ import annotations

import torch

from ..sampling import Denoiser, NoiseSchedule

__all__ = ["draw_noise", "eps_loss", "held_out_loss"]


def draw_noise(x0: torch.Tensor, schedule: NoiseSchedule,
               generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniform integer timesteps and standard normal noise for a batch, on ``x0``'s device. ``generator`` is a CPU
    generator: the draws are made on the CPU and moved, so they are the same numbers on every device."""
    t = torch.randint(0, schedule.num_train_timesteps, (x0.shape[0],), generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    if x0.device != t.device:
        t, noise = t.to(x0.device), noise.to(x0.device)
    return t, noise


def eps_loss(eps: Denoiser, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, schedule: NoiseSchedule,
             reduction: str = "mean", **cond) -> torch.Tensor:
    """``|| eps(x_t, t) - noise ||^2`` averaged over pixels; ``reduction="none"`` keeps one value per sample."""
    xt = schedule.add_noise(x0, noise, t)
    per_sample = (eps(xt, t, **cond).float() - noise).pow(2).flatten(1).mean(1)
    return per_sample if reduction == "none" else per_sample.mean()


@torch.no_grad()
def held_out_loss(eps: Denoiser, x0: torch.Tensor, schedule: NoiseSchedule, *, y: torch.Tensor | None = None,
                  draws: int = 4, seed: int = 0, batch_size: int = 500, text: torch.Tensor | None = None) -> float:
    """Mean denoising loss over ``draws`` fixed (t, noise) draws per sample: the same seed gives the same draws,
    so two denoisers scored with one seed are compared on identical noise. ``y`` / ``text``: per-sample labels
    or caption embeddings. Runs on ``x0``'s device (the draws are made on the CPU and moved)."""
    g = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    for _ in range(draws):
        t, noise = draw_noise(x0, schedule, g)
        for s in range(0, x0.shape[0], batch_size):
            sl = slice(s, s + batch_size)
            cond = {k: v[sl] for k, v in (("y", y), ("text", text)) if v is not None}
            total += eps_loss(eps, x0[sl], t[sl], noise[sl], schedule, reduction="none", **cond).sum().item()
            count += x0[sl].shape[0]
    return total / count
