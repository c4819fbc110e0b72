"""Samplers as free functions over a denoiser callable ``eps(x, t, **cond) -> eps_hat``.

A solver never sees a model class: a backbone, a compartment, a classifier-free-guided or a composed
denoiser are all just callables (k-diffusion's design). The update rules are diffusers' (DDIMScheduler and
DPMSolverMultistepScheduler): they are well tested, and the loop around them is ours because diffusers'
pipelines are tied to its own model classes.

Both solvers use "trailing" timestep spacing (the first step starts at t = T-1, where the cosine schedule is
pure noise). With ``clip=True`` they clip the predicted x_0 to [-1, 1] (``clip=r``: to [-r, r]) with epsilon
recomputed from the clipped x_0. That is a property of the data, not of the solver: it is off by default, and
``cdm.generation`` sets it to the data's codec's ``x0_range`` (pixels: 1; latents: their recorded range).

Devices: a solver works where the noise is (``cdm.generation`` puts it on the backbone's device); stochastic
solvers draw their per-step noise on the CPU from ``generator`` and move it, so a device changes no draw.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Protocol

import torch

from .schedule import NoiseSchedule

__all__ = ["SOLVERS", "Denoiser", "classifier_free_guidance", "sample"]


class Denoiser(Protocol):
    def __call__(self, x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor: ...


def _range(clip: bool | float) -> float:
    return 1.0 if clip is True else float(clip or 1.0)


def _ddim(schedule: NoiseSchedule, clip: bool | float):
    from diffusers import DDIMScheduler

    return DDIMScheduler(**schedule.scheduler_kwargs(), clip_sample=bool(clip), clip_sample_range=_range(clip),
                         set_alpha_to_one=True, timestep_spacing="trailing"), {"eta": 0.0,
                                                                               "use_clipped_model_output": True}


def _dpmpp2m(schedule: NoiseSchedule, clip: bool | float):
    from diffusers import DPMSolverMultistepScheduler

    class StaticThreshold(DPMSolverMultistepScheduler):
        """diffusers' thresholding is dynamic (clip to the 99.5% quantile s in [1, r], then divide by s); cdm
        clips x_0 to the data's box [-r, r] and keeps its scale. With r = 1 the two agree exactly."""

        def _threshold_sample(self, sample: torch.Tensor) -> torch.Tensor:
            r = self.config.sample_max_value
            return sample.clamp(-r, r)

    return StaticThreshold(**schedule.scheduler_kwargs(), algorithm_type="dpmsolver++", solver_order=2,
                           thresholding=bool(clip), sample_max_value=_range(clip), timestep_spacing="trailing",
                           lower_order_final=True, final_sigmas_type="zero"), {}


class _Ancestral:
    """Ancestral sampling (DDIM with eta = 1, i.e. DDPM's posterior variance): a discretised reverse SDE whose
    noise matches the forward diffusion, which the Ito density estimator (cdm.composition) relies on.

    diffusers' DDIMScheduler computes this step too (same timesteps, same noise draws), but at the first trailing
    step, where alpha_bar(T-1) = 2.4e-9 under the cosine schedule, its ``(1 - a_prev - std**2) ** 0.5`` takes
    the root of a float32 rounding error below zero for some step counts (5 steps: NaN images). This step is
    the same formula with that term clamped at zero; otherwise it follows DDIMScheduler line for line."""

    def __init__(self, schedule: NoiseSchedule, clip: bool | float):
        self.inner, _ = _ddim(schedule, clip)
        self.clip = clip

    def set_timesteps(self, steps: int) -> None:
        self.inner.set_timesteps(steps)

    @property
    def timesteps(self) -> torch.Tensor:
        return self.inner.timesteps

    def step(self, e: torch.Tensor, t, x: torch.Tensor, generator: torch.Generator | None = None, **_):
        sch = self.inner
        t = int(t)
        prev = t - sch.config.num_train_timesteps // sch.num_inference_steps
        a_t = sch.alphas_cumprod[t]
        a_p = sch.alphas_cumprod[prev] if prev >= 0 else sch.final_alpha_cumprod
        x0 = (x - (1 - a_t) ** 0.5 * e) / a_t**0.5
        if self.clip:
            x0 = x0.clamp(-_range(self.clip), _range(self.clip))
            e = (x - a_t**0.5 * x0) / (1 - a_t) ** 0.5
        var = (1 - a_p) / (1 - a_t) * (1 - a_t / a_p)
        direction = (1 - a_p - var).clamp(min=0.0) ** 0.5 * e
        noise = torch.randn(e.shape, generator=generator, dtype=e.dtype).to(e.device)
        return _Step(a_p**0.5 * x0 + direction + var**0.5 * noise)


class _Step:
    def __init__(self, prev_sample: torch.Tensor):
        self.prev_sample = prev_sample


def _ddpm(schedule: NoiseSchedule, clip: bool | float):
    return _Ancestral(schedule, clip), {}


# name -> factory(schedule, clip) -> (diffusers scheduler, step kwargs)
SOLVERS: dict[str, Callable] = {"ddim": _ddim, "dpmpp2m": _dpmpp2m, "ddpm": _ddpm}
STOCHASTIC = {"ddpm"}  # solvers that draw fresh noise at every step (from ``generator``)


def classifier_free_guidance(eps: Denoiser, scale: float, uncond: dict) -> Denoiser:
    """``eps_u + scale * (eps_c - eps_u)`` (scale 1 = purely conditional), in one batched call.

    ``uncond`` replaces condition entries for the unconditional branch (e.g. ``{"y": null_label}``); a tensor
    condition with a batch dimension is concatenated with its unconditional counterpart.
    """
    if scale == 1.0:
        return eps

    def guided(x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        b = x.shape[0]
        unknown = sorted(set(uncond) - set(cond))
        if unknown:
            raise ValueError(f"unconditional entries {unknown} have no conditional counterpart")
        cond2 = {}
        for k, v in cond.items():
            if k in uncond:
                cond2[k] = torch.cat([v, torch.as_tensor(uncond[k], device=v.device, dtype=v.dtype).expand_as(v)])
            elif torch.is_tensor(v) and v.ndim and v.shape[0] == b:
                cond2[k] = torch.cat([v, v])
            else:
                cond2[k] = v
        out = eps(torch.cat([x, x]), torch.cat([t, t]), **cond2)
        e_c, e_u = out[:b], out[b:]
        return e_u + scale * (e_c - e_u)

    return guided


@torch.no_grad()
def sample(
    eps: Denoiser,
    noise: torch.Tensor,
    *,
    schedule: NoiseSchedule,
    solver: str = "ddim",
    steps: int = 50,
    cond: dict | None = None,
    clip: bool | float = False,
    bf16: bool = False,
    callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Integrate the reverse process from ``noise`` (x_T) to x_0 with ``steps`` denoiser evaluations.

    ``clip``: clip the predicted x_0 to [-1, 1] at every step (a number r: to [-r, r]; the codec decides, see
    :func:`cdm.generation.generate`). ``callback(i, t, x)`` is called after each step. ``bf16`` runs the
    denoiser under bfloat16 autocast (the solver state stays float32). Stochastic solvers draw their per-step
    noise from ``generator``.
    """
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; known: {', '.join(SOLVERS)}")
    if not 1 <= steps <= schedule.num_train_timesteps:
        raise ValueError(f"steps must be in 1..{schedule.num_train_timesteps}, got {steps}")
    sched, step_kwargs = SOLVERS[solver](schedule, clip)
    if solver in STOCHASTIC:
        step_kwargs["generator"] = generator if generator is not None else torch.Generator().manual_seed(0)
    sched.set_timesteps(steps)
    x = noise.float()
    cond = cond or {}
    amp = torch.autocast(x.device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    timesteps = sched.timesteps
    if progress:
        from rich.progress import track

        timesteps = track(timesteps, description=f"{solver} x{steps}", transient=True)
    for i, t in enumerate(timesteps):
        tb = torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long)
        with amp:
            e = eps(x, tb, **cond)
        x = sched.step(e.float(), t, x, **step_kwargs).prev_sample
        if callback is not None:
            callback(i, tb, x)
    return x
