"""DP-SGD training of one compartment (Opacus per-sample gradients and accountants).

What is private: the compartment's prompt table, with respect to adding or removing ONE sample of its
source (sample-level (epsilon, delta)-DP under Poisson sampling). The backbone is public and frozen.

How a step goes (Abadi et al. 2016, with augmentation multiplicity as in De et al. 2022 / Dockhorn et al.):

1. Poisson sampling: each sample of the source joins the batch independently with probability
   ``q = batch_size / N`` (``batch_size`` is the *expected* batch size), drawn from the step's generator.
2. Each chosen sample gets ``augmult`` = K independent (t, noise) draws (drawn here, outside the model); the
   K rows go through :class:`PromptDenoiser`, a small module whose forward takes the batch and calls the
   frozen backbone with the prompt keywords ``compartment.prompts(rows)``. Opacus' ``GradSampleModule`` hooks the one
   trainable submodule, the prompt table's ``nn.Embedding``, and yields one gradient per row.
3. The K row gradients of a sample are averaged (one gradient per *sample*), clipped to ``max_grad_norm`` C,
   summed, and Gaussian noise ``N(0, (sigma C)^2 I)`` is added to every entry of the table; the sum is divided
   by the expected batch size and handed to Adam (post-processing, so any optimiser keeps the guarantee).
4. The accountant (Opacus RDP or PRV) composes the ``steps`` subsampled Gaussian mechanisms; ``sigma`` is
   Opacus' ``get_noise_multiplier`` for the requested epsilon, delta, q and steps. The record carries the
   epsilon that accountant reports for what was actually run.

Deterministic given (source content, configs, seed): canonical order, per-step generators for the Poisson
mask, timesteps, noise, label dropout and the DP noise. The DP noise is drawn from a seeded CPU generator
so runs are reproducible (and the same draws on every device: every draw is made on the CPU and moved to the
backbone's device, where the prompt table, the optimiser and the batches live); that is a *pseudo*-random
source, which is what every DP-SGD implementation including Opacus' default uses (Opacus' ``secure_mode`` is
the cryptographic alternative; not used here).
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..backbone import Backbone
from ..compartments import Compartment, CompartmentConfig
from ..data import Source
from ..errors import TrainingError
from ..io import config_from_dict
from ..training.checkpoint import load_checkpoint, save_checkpoint
from ..training.common import deterministic_algorithms, lr_at, progress_bar, step_generator
from ..training.compartment import check_source_fits, model_space, training_record

__all__ = ["ACCOUNTANTS", "DPConfig", "PromptDenoiser", "calibrate", "epsilon_spent", "per_sample_grads",
           "train_compartment_dp"]

_TAG = "cdm-compartment-dp"
ACCOUNTANTS = ("rdp", "prv")


@dataclass(frozen=True)
class DPConfig:
    """The privacy side of a compartment's training (the rest is its :class:`CompartmentConfig`).

    ``delta=None``: ``min(1/N, 1e-5)`` for a source of N samples. ``max_grad_norm``: per-sample clipping norm
    C. ``augmult``: (t, noise) draws per sample, averaged before clipping. ``accountant``: ``rdp`` | ``prv``.
    """

    epsilon: float
    delta: float | None = None
    max_grad_norm: float = 1.0
    augmult: int = 1
    accountant: str = "rdp"

    def __post_init__(self) -> None:
        problems = []
        if not (isinstance(self.epsilon, (int, float)) and math.isfinite(self.epsilon) and self.epsilon > 0):
            problems.append(f"epsilon must be a positive finite number (got {self.epsilon})")
        if self.delta is not None and not 0 < self.delta < 1:
            problems.append(f"delta must be in (0, 1) (got {self.delta})")
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            problems.append(f"max_grad_norm must be positive (got {self.max_grad_norm})")
        if self.augmult < 1:
            problems.append(f"augmult must be >= 1 (got {self.augmult})")
        if self.accountant not in ACCOUNTANTS:
            problems.append(f"accountant must be one of {', '.join(ACCOUNTANTS)} (got {self.accountant!r})")
        if problems:
            raise ValueError("; ".join(problems))

    def delta_for(self, n: int) -> float:
        return float(self.delta) if self.delta is not None else min(1.0 / n, 1e-5)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> DPConfig:
        return config_from_dict(cls, d, "dp")


class PromptDenoiser(nn.Module):
    """``forward(x_t, t, rows, labels) -> eps``: the compartment's prompts looked up by row, fed to the frozen
    backbone. The backbone is held outside the module tree (not a submodule), so Opacus sees exactly one
    trainable module, the prompt table, whose forward takes the batch."""

    def __init__(self, backbone: Backbone, compartment: Compartment):
        super().__init__()
        self.prompts = compartment.prompts
        self._frozen = (backbone,)  # a tuple: not registered, never hooked, never in parameters()

    def forward(self, xt: torch.Tensor, t: torch.Tensor, rows: torch.Tensor, labels: torch.Tensor | None = None):
        net = self._frozen[0].net
        return net(xt, t, y=labels, **self.prompts(rows))


def _accountant(kind: str):
    from opacus.accountants import create_accountant

    return create_accountant(kind)


def epsilon_spent(noise_multiplier: float, sample_rate: float, steps: int, delta: float,
                  accountant: str = "rdp") -> float:
    """The epsilon Opacus' accountant gives ``steps`` subsampled Gaussian steps (noise ``noise_multiplier``,
    Poisson rate ``sample_rate``) at ``delta``."""
    acc = _accountant(accountant)
    if steps > 0:
        acc.history = [(float(noise_multiplier), float(sample_rate), int(steps))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # RDP's "optimal order is the largest alpha" note
        return float(acc.get_epsilon(delta=delta))


def calibrate(epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "rdp") -> float:
    """The noise multiplier Opacus finds for (epsilon, delta) after ``steps`` steps at ``sample_rate``; a
    :class:`TrainingError` if no noise level reaches it."""
    from opacus.accountants.utils import get_noise_multiplier

    if not 0 < sample_rate <= 1:
        raise TrainingError(f"sample rate {sample_rate:.4g} is not in (0, 1]: the expected batch size must not "
                            "exceed the number of samples")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sigma = get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=sample_rate,
                                         steps=steps, accountant=accountant, epsilon_tolerance=0.005)
    except (ValueError, OverflowError, ZeroDivisionError) as e:
        raise TrainingError(f"epsilon {epsilon:g} at delta {delta:.3g} cannot be met with {steps} steps at sample "
                            f"rate {sample_rate:.4g} ({e}); allow a larger epsilon, or use fewer steps or a "
                            "smaller batch") from None
    if not math.isfinite(sigma) or sigma <= 0:
        raise TrainingError(f"epsilon {epsilon:g} cannot be met with {steps} steps at sample rate {sample_rate:.4g}")
    return float(sigma)


def per_sample_grads(gsm, comp: Compartment, xt: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                     y: torch.Tensor | None, augmult: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-*sample* gradients of the prompt table, ``(B, *table.shape)``, for rows grouped as B samples x
    ``augmult`` consecutive draws: each is the gradient of that sample's mean loss over its draws. Also returns
    the per-row losses. ``gsm``: Opacus' ``GradSampleModule`` around a :class:`PromptDenoiser` of ``comp``."""
    rows = xt.shape[0]
    weight = comp.prompts.table.weight
    labels = comp.backbone_labels(y, rows)
    eps = gsm(xt, t, comp.row(y, rows).to(weight.device), None if labels is None else labels.to(weight.device))
    per_row = (eps.float() - noise).pow(2).flatten(1).mean(1)
    weight.grad_sample = None
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        (per_row.sum() / augmult).backward()
    gs = weight.grad_sample.view(rows // augmult, augmult, *weight.shape).sum(1)
    weight.grad_sample = None
    weight.grad = None
    return gs, per_row.detach()


def _train(backbone: Backbone, source: Source, cfg: CompartmentConfig, dp: DPConfig, *, work_dir=None,
           max_minutes: float | None = None, progress: bool = True, max_noise_multiplier: float = 50.0,
           inputs: torch.Tensor | None = None):
    from opacus import GradSampleModule

    if cfg.text or cfg.adapter_rank or cfg.lora_rank:
        raise TrainingError("DP-SGD trains prompt tables only: text-conditioned compartments, adapters and LoRA are "
                            "not supported with DP yet")
    lr_at(0, lr=cfg.lr, warmup=cfg.warmup, steps=cfg.steps, schedule=cfg.lr_schedule)
    backbone.freeze()
    comp = Compartment.for_backbone(backbone, cfg)
    check_source_fits(source, comp)
    n = len(source)
    q = cfg.batch_size / n
    delta = dp.delta_for(n)
    sigma = calibrate(dp.epsilon, delta, q, cfg.steps, dp.accountant)
    if sigma > max_noise_multiplier:
        raise TrainingError(f"epsilon {dp.epsilon:g} needs noise multiplier {sigma:.1f} (> {max_noise_multiplier:g}) "
                            f"with {cfg.steps} steps at expected batch {cfg.batch_size} of {n} samples: the noise "
                            "would drown every gradient; allow a larger epsilon or use fewer steps")
    dev = backbone.device
    data, x_all = model_space(backbone.codec, source, inputs)
    y_all = torch.tensor(data.labels if data.labels is not None else np.zeros(n), dtype=torch.long)
    x_all, y_all = x_all.to(dev), y_all.to(dev)
    comp.init_prompts(step_generator(_TAG + "/init", cfg.seed, 0))  # drawn on the CPU
    comp.to(dev)
    model = PromptDenoiser(backbone, comp)
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    weight = comp.prompts.table.weight
    opt = torch.optim.Adam([weight], lr=cfg.lr)
    step, wall, losses = 0, 0.0, []
    ckpt = Path(work_dir) / "checkpoint.safetensors" if work_dir is not None else None
    key = {"config": cfg.to_dict(), "dp": dp.to_dict(), "content_hash": source.content_hash,
           "backbone_hash": backbone.hash}
    if ckpt is not None and ckpt.exists():
        header = load_checkpoint(ckpt, comp, None, opt)
        if any(header.get(k) != v for k, v in key.items()):
            raise TrainingError(f"{ckpt}: belongs to another source, config or backbone; clear it to start over")
        step, wall, losses = header["step"], header["wall_seconds"], header["recent_losses"]
    K, C = dp.augmult, dp.max_grad_norm
    sched = backbone.schedule
    t_start = time.perf_counter()
    batch_sizes: list[int] = []
    with progress_bar(f"dp compartment {source.id}", cfg.steps, step, progress) as show:
        while step < cfg.steps:
            g = step_generator(_TAG, cfg.seed, step)
            chosen = (torch.rand(n, generator=g) < q).nonzero()[:, 0].to(dev)
            b = int(chosen.numel())
            batch_sizes.append(b)
            rows = y_all[chosen].clone()
            if cfg.conditional:
                rows[(torch.rand(b, generator=g) < cfg.label_dropout).to(dev)] = comp.null_class
            else:
                rows.zero_()
            total = torch.zeros_like(weight)
            if b > 0:
                x0 = x_all[chosen].repeat_interleave(K, dim=0)
                rows_k = rows.repeat_interleave(K)
                t = torch.randint(0, sched.num_train_timesteps, (b * K,), generator=g).to(dev)
                noise = torch.randn(x0.shape, generator=g).to(dev)
                gs, per_row = per_sample_grads(gsm, comp, sched.add_noise(x0, noise, t), t, noise,
                                               rows_k if cfg.conditional else None, K)
                loss = per_row.mean()
                norms = gs.flatten(1).norm(dim=1)
                factor = (C / (norms + 1e-6)).clamp(max=1.0)
                total = torch.einsum("b,b...->...", factor, gs)
                if not torch.isfinite(loss):
                    raise TrainingError(f"loss is {loss.item()} at step {step} of compartment {source.id!r}; stopped")
                losses.append(round(loss.item(), 5))
            noisy = (total + torch.randn(weight.shape, generator=g).to(dev) * (sigma * C)) / cfg.batch_size
            weight.grad = noisy
            for group in opt.param_groups:
                group["lr"] = lr_at(step, lr=cfg.lr, warmup=cfg.warmup, steps=cfg.steps, schedule=cfg.lr_schedule)
            opt.step()
            weight.grad = None
            step += 1
            show(step, float(np.mean(losses[-50:])) if losses else float("nan"))
            elapsed = time.perf_counter() - t_start
            if ckpt is not None and (step % cfg.checkpoint_every == 0 or step == cfg.steps):
                ckpt.parent.mkdir(parents=True, exist_ok=True)
                save_checkpoint(ckpt, comp, None, opt, {**key, "step": step, "wall_seconds": round(wall + elapsed, 2),
                                                        "recent_losses": losses[-100:]})
                if max_minutes is not None and elapsed > 60 * max_minutes and step < cfg.steps:
                    break
    wall += time.perf_counter() - t_start
    gsm._close()
    comp.eval()
    achieved = epsilon_spent(sigma, q, step, delta, dp.accountant)
    dp_entry = {"epsilon": round(achieved, 4), "target_epsilon": dp.epsilon, "delta": delta,
                "noise_multiplier": sigma, "max_grad_norm": C, "sample_rate": q,
                "expected_batch_size": cfg.batch_size, "steps": step, "accountant": dp.accountant, "augmult": K,
                "unit": "sample", "mean_batch_size": round(float(np.mean(batch_sizes)), 2) if batch_sizes else None,
                "library": "opacus " + _opacus_version()}
    # No best-step selection under DP: choosing a step by a loss on the private data would itself leak
    # (unaccounted); a DP compartment is its last step.
    record = training_record(backbone, source, cfg, step=step, wall=wall, losses=losses, dp=dp_entry,
                             validation=None)
    return (comp if record.finished else None), record


def _opacus_version() -> str:
    from importlib.metadata import version

    return version("opacus")


def train_compartment_dp(backbone: Backbone, source: Source, cfg: CompartmentConfig, dp: DPConfig | None = None, *,
                         epsilon: float | None = None, **kwargs) -> tuple[Compartment | None, dict]:
    """Train a compartment with DP-SGD; returns ``(compartment, record)`` like
    :func:`cdm.training.compartment.train_compartment`, with ``record.dp`` = {epsilon (achieved, from the
    accountant), target_epsilon, delta, noise_multiplier, max_grad_norm, sample_rate, steps, accountant,
    augmult, ...}. ``cfg.batch_size`` is the *expected* (Poisson) batch size; ``cfg.grad_clip`` is unused (the
    per-sample clip is ``dp.max_grad_norm``). Give ``dp`` or ``epsilon=`` (other fields default).

    Keywords: ``work_dir`` (resumable checkpoint), ``max_minutes``, ``progress``, ``inputs`` (the source's rows
    in the backbone's space, e.g. cached latents), ``max_noise_multiplier`` (refuse a budget that needs more noise,
    default 50). A :class:`TrainingError` when the epsilon cannot be met with these steps and this batch."""
    if dp is None:
        if epsilon is None:
            raise ValueError("give a DPConfig or epsilon=")
        dp = DPConfig(epsilon=epsilon)
    with deterministic_algorithms():
        return _train(backbone, source, cfg, dp, **kwargs)
