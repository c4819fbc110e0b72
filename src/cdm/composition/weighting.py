"""How composition weights w_i(x, t) are obtained (Prop. 3.1 of the CDM paper).

The composed denoiser is ``eps(x, t) = sum_i w_i(x, t) eps_i(x, t)`` with
``w_i = lambda_i p_t^i(x) / sum_j lambda_j p_t^j(x)``: the posterior that the noisy ``x`` came from source i.
A weighting returns ``log p_t^i(x)`` up to a constant shared by all i (or any other per-source logit whose
softmax with ``log lambda`` gives the weights); the composed denoiser adds ``log lambda`` and normalises.

Defined here (every weighting is registered, with what it needs, in :mod:`cdm.composition.registry`):

- ``naive``: w = lambda (a plain weighted average; the paper's baseline, which makes hybrids).
- ``single``: one source k ~ lambda per sample, then only eps_k (the paper's other baseline).
- ``oracle``: exact ``log p_t^i`` from callables (analytic cases, tests).
- ``ito``: training-free density tracking along the sampling path (Skreta et al. 2024), below.

Learned weightings (:mod:`cdm.composition.learned`, their heads in :mod:`cdm.composition.heads`):

- ``router``: the paper's joint router heads on the mid-block tokens of each compartment's forward.
- ``classifier``: a separate noisy classifier ``f(x_t, t)`` over the sources (Prop. 3.2).
- ``isolated``: per-compartment density-ratio heads, each trained on its own source against public data.

The Ito density estimator. Let ``q_t`` be the forward marginal of one source under the VP SDE
``dx = f dt + g dW`` with ``f = -beta x / 2``, ``g^2 = beta``. Fokker-Planck gives
``d/dt log q = -div f - <f, s> + (g^2/2)(div s + |s|^2)`` with ``s = grad log q``. Run a path backwards in
time (sampling time tau = -t) with a reverse SDE ``dx = (...) dtau + g dW``: Ito's lemma adds
``(g^2/2) div s dtau``, which cancels the divergence term (so no Jacobian is needed) and leaves, whatever the
drift,

    d log q_i(x) = <dx, s_i> + (div f + <f, s_i> - (g^2/2) |s_i|^2) dtau
                 = <dx, s_i> - (beta/2) (d + <x, s_i> + |s_i|^2) dtau,

with ``s_i = -eps_i / sigma_t``. The signs: every term of the drift correction is negative (the density of
each source grows only through ``<dx, s_i>``), and ``d`` is common to all sources, so it cancels in the
softmax. In discrete time, ``beta dtau`` over a step from t to t' < t is ``log abar_{t'} - log abar_t``. The
path must carry the forward diffusion's noise: sample with the ``ddpm`` (ancestral) solver. With a
deterministic solver the divergence term does not cancel and this estimator is biased.

Devices: every weighting returns its (B, n) logits on the device of ``active`` (the composed denoiser's, i.e. the
samples'); random draws (the single baseline's) are made on the CPU and moved.
"""

from __future__ import annotations

from typing import Protocol
from collections.abc import Callable

import torch

from ..sampling import NoiseSchedule

__all__ = ["Weighting", "NaiveWeighting", "SingleWeighting", "OracleWeighting", "ItoWeighting"]


class Weighting(Protocol):
    """Per-source log-likelihoods (up to a shared constant) for the composed denoiser."""

    name: str

    def reset(self) -> None:
        """Forget per-path state (called when a new sampling run starts)."""

    def log_likelihood(self, x: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, active: torch.Tensor,
                       log_prior: torch.Tensor, **extra) -> torch.Tensor:
        """``x`` (B, ...), ``t`` (B,), ``eps`` (B, n, ...) for active pairs (others are zero), ``active`` (B, n)
        bool, ``log_prior`` (B, n). Returns (B, n). A weighting with ``needs_mid = True`` also gets ``mid``
        (B, n, L, D): the tokens after the backbone's mid block in each (sample, compartment) forward."""


class NaiveWeighting:
    name = "naive"

    def reset(self) -> None:
        pass

    def log_likelihood(self, x, t, eps, active, log_prior, **extra):
        return torch.zeros(active.shape, dtype=torch.float64, device=active.device)


class SingleWeighting:
    """Draw one source per sample from lambda on the first call; only that source is evaluated after it."""

    name = "single"

    def __init__(self, generator: torch.Generator | None = None):
        self.generator = generator or torch.Generator().manual_seed(0)
        self.choice: torch.Tensor | None = None

    def reset(self) -> None:
        self.choice = None

    def choose(self, batch: int, log_prior: torch.Tensor) -> torch.Tensor:
        """The drawn source of each row, (B,) on the CPU (where the generator draws)."""
        if self.choice is None or self.choice.shape[0] != batch:
            probs = log_prior.double().cpu().softmax(-1)  # (n,) or (B, n)
            self.choice = torch.multinomial(probs.expand(batch, -1), 1, generator=self.generator)[:, 0]
        return self.choice

    def log_likelihood(self, x, t, eps, active, log_prior, **extra):
        k = self.choose(x.shape[0], log_prior).to(active.device)
        out = torch.full(active.shape, float("-inf"), dtype=torch.float64, device=active.device)
        out[torch.arange(x.shape[0], device=active.device), k] = 0.0
        return out


class OracleWeighting:
    """Exact log-densities: ``log_density[i](x, t) -> (B,)``."""

    name = "oracle"

    def __init__(self, log_density: list[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]):
        self.log_density = log_density

    def reset(self) -> None:
        pass

    def log_likelihood(self, x, t, eps, active, log_prior, **extra):
        return torch.stack([f(x, t).double().to(active.device) for f in self.log_density], dim=1)


class ItoWeighting:
    """Training-free weights from the Ito density estimator (see the module docstring)."""

    name = "ito"

    def __init__(self, schedule: NoiseSchedule):
        self.log_abar = schedule.alphas_cumprod.log()  # float64, on the CPU; a copy per device in _log_abar
        self._on: dict[torch.device, torch.Tensor] = {}
        self.reset()

    def _log_abar(self, device: torch.device) -> torch.Tensor:
        if device == self.log_abar.device:
            return self.log_abar
        if device not in self._on:
            self._on[device] = self.log_abar.to(device)
        return self._on[device]

    def reset(self) -> None:
        self.log_q: torch.Tensor | None = None
        self.prev: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # x, t, scores (B, n, ...)

    def log_likelihood(self, x, t, eps, active, log_prior, **extra):
        b, n = active.shape
        log_abar = self._log_abar(t.device)
        sigma = (1 - log_abar[t].exp()).sqrt().view(b, 1, *([1] * (x.ndim - 1)))
        scores = -eps.double() / sigma
        if self.log_q is None or self.log_q.shape != (b, n) or self.prev is None or self.log_q.device != x.device:
            self.log_q = torch.zeros(b, n, dtype=torch.float64, device=x.device)  # at t = T every source is N(0, I)
        else:
            x0, t0, s0 = self.prev
            beta_dtau = (log_abar[t] - log_abar[t0]).view(b, 1)  # > 0: abar grows as t decreases
            dx = (x.double() - x0.double()).unsqueeze(1)
            flat = lambda v: v.flatten(2)  # noqa: E731
            inner_dx = (flat(dx) * flat(s0)).sum(-1)
            inner_x = (flat(x0.double().unsqueeze(1)) * flat(s0)).sum(-1)
            norm2 = flat(s0).pow(2).sum(-1)
            # d is shared by all sources and dropped (it cancels in the softmax)
            self.log_q = self.log_q + inner_dx - 0.5 * beta_dtau * (inner_x + norm2)
        self.prev = (x.detach(), t.detach(), scores)
        return self.log_q

