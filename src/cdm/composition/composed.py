"""The composed denoiser: ``eps(x, t) = sum_i w_i(x, t) eps_i(x, t)``, itself a denoiser every solver takes.

Denoisers are evaluated through a *bank*: ``bank(x, t, index, **cond)`` evaluates, for each row, the denoiser
``index[row]``. :class:`CallableBank` wraps any plain callables ``eps_i(x, t, **cond)``; a compartment bank on
one backbone evaluates every (sample, compartment) pair in a single batched forward (prompts stacked along
the batch).

Sparse gating: once a sample's weight on a source falls below ``threshold``, that source is no longer
evaluated for that sample (and its weight is zero; the rest are renormalised). ``evals`` counts the
(sample, source) evaluations actually made, so the cost is measured, not guessed.

Devices: the composed denoiser works where ``x`` is (the bank's backbone moves what it needs); the priors, gates and
weights live beside ``x``, and the recorded trajectory is kept on the CPU.

Classifier-free guidance composes from outside (``classifier_free_guidance(composed, scale, {"y": null})``):
the unconditional half of the batch is then weighted by the unconditional posteriors.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from ..sampling import Denoiser
from .weighting import SingleWeighting, Weighting

__all__ = ["CallableBank", "ComposedDenoiser"]


class CallableBank:
    """Evaluate plain denoiser callables row-wise: one call per denoiser on the rows that need it."""

    def __init__(self, denoisers: Sequence[Denoiser]):
        self.denoisers = list(denoisers)

    def __len__(self) -> int:
        return len(self.denoisers)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, index: torch.Tensor, **cond) -> torch.Tensor:
        out = torch.empty_like(x)
        for i in index.unique().tolist():
            rows = (index == i).nonzero()[:, 0]
            sub = {k: (v[rows] if torch.is_tensor(v) and v.ndim and v.shape[0] == x.shape[0] else v)
                   for k, v in cond.items()}
            out[rows] = self.denoisers[i](x[rows], t[rows], **sub).to(x.dtype)
        return out


class ComposedDenoiser:
    """``sum_i w_i eps_i`` with ``w = softmax(log lambda + weighting.log_likelihood)``, optionally sparse.

    ``bank``: a bank or a list of plain denoisers. ``priors``: lambda (normalised here; default uniform).
    ``record=True`` keeps the weights of every call (``trajectory()``: steps x B x n).
    """

    def __init__(self, bank: Callable | Sequence[Denoiser], weighting: Weighting, *,
                 priors: Sequence[float] | None = None, class_priors=None,
                 threshold: float = 0.0, record: bool = True):
        self.bank = bank if callable(bank) and not isinstance(bank, (list, tuple)) else CallableBank(bank)
        n = len(self.bank)
        if n < 1:
            raise ValueError("nothing to compose: no denoisers")
        lam = torch.ones(n, dtype=torch.float64) if priors is None else torch.as_tensor(priors, dtype=torch.float64)
        if lam.shape != (n,) or not torch.isfinite(lam).all() or (lam < 0).any() or lam.sum() <= 0:
            raise ValueError(f"priors must be {n} non-negative numbers with a positive sum, got {list(priors)}")
        if not 0.0 <= threshold < 1.0:
            raise ValueError(f"threshold must be in [0, 1), got {threshold}")
        self.n = n
        self.log_prior = (lam / lam.sum()).log()
        # lambda_i(y) for class-conditional composition: (n, C) counts of class y in source i, so a source
        # without a class gets weight 0 for it; rows of other labels (the null class) use ``priors``.
        self.class_log_prior = None
        if class_priors is not None:
            cp = torch.as_tensor(np.asarray(class_priors), dtype=torch.float64)
            if cp.ndim != 2 or cp.shape[0] != n or not torch.isfinite(cp).all() or (cp < 0).any():
                raise ValueError(f"class_priors must be non-negative, shaped ({n}, classes); got {tuple(cp.shape)}")
            total = cp.sum(0, keepdim=True)
            self.class_log_prior = torch.where(total > 0, cp / total.clamp(min=1e-300), torch.nan).log()
        self.weighting = weighting
        self.threshold = threshold
        self.record = record
        self.reset()

    def reset(self) -> None:
        """Start a new sampling run: forget gates, path state, counts and the recorded trajectory."""
        self.active: torch.Tensor | None = None
        self.evals = 0
        self.calls = 0
        self._trajectory: list[torch.Tensor] = []
        self._times: list[torch.Tensor] = []
        self.weighting.reset()

    def trajectory(self) -> torch.Tensor:
        """Weights of every call so far: (calls, B, n), float64."""
        return torch.stack(self._trajectory) if self._trajectory else torch.empty(0, 0, self.n, dtype=torch.float64)

    def times(self) -> torch.Tensor:
        return torch.stack(self._times) if self._times else torch.empty(0, 0, dtype=torch.long)

    def row_log_prior(self, y: torch.Tensor | None, b: int) -> torch.Tensor:
        """(B, n) log lambda of each row: by class when class priors are set and the row's label has any."""
        lp = self.log_prior.unsqueeze(0).expand(b, -1)
        if self.class_log_prior is None or y is None:
            return lp
        y = torch.as_tensor(y).long().reshape(-1).cpu()
        y = y.expand(b) if y.numel() == 1 else y
        known = (y >= 0) & (y < self.class_log_prior.shape[1])
        by_class = self.class_log_prior[:, y.clamp(0, self.class_log_prior.shape[1] - 1)].T  # (B, n)
        use = known & ~by_class.isnan().any(1)
        return torch.where(use.unsqueeze(1), by_class, lp)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        b, n = x.shape[0], self.n
        cpu_prior = self.row_log_prior(cond.get("y"), b)  # (B, n) on the CPU, where the single weighting draws
        log_prior = cpu_prior.to(x.device)
        if self.active is None or self.active.shape[0] != b or self.active.device != x.device:
            self.reset()
            self.active = torch.ones(b, n, dtype=torch.bool, device=x.device)
        self.active &= ~log_prior.isinf()  # a zero prior: never evaluate that source for that row
        if isinstance(self.weighting, SingleWeighting):  # only the drawn source is ever evaluated
            k = self.weighting.choose(b, cpu_prior)
            self.active = torch.nn.functional.one_hot(k, n).bool().to(x.device)
        rows, idx = self.active.nonzero(as_tuple=True)
        sub = {k: (v[rows] if torch.is_tensor(v) and v.ndim and v.shape[0] == b else v) for k, v in cond.items()}
        extra = {}
        if getattr(self.weighting, "needs_mid", False):  # learned heads read the same forward's mid tokens
            eps_rows, mid_rows = self.bank(x[rows], t[rows], idx, return_mid=True, **sub)
            mid = torch.zeros((b, n, *mid_rows.shape[1:]), dtype=mid_rows.dtype, device=x.device)
            mid[rows, idx] = mid_rows
            extra["mid"] = mid
        else:
            eps_rows = self.bank(x[rows], t[rows], idx, **sub)
        self.evals += int(rows.numel())
        self.calls += 1
        eps = torch.zeros((b, n, *x.shape[1:]), dtype=eps_rows.dtype, device=x.device)
        eps[rows, idx] = eps_rows
        logits = log_prior + self.weighting.log_likelihood(x, t, eps, self.active, log_prior, **extra)
        logits = logits.masked_fill(~self.active, float("-inf"))
        w = logits.softmax(dim=1)
        if self.threshold > 0:
            keep = (w >= self.threshold) | (w == w.max(dim=1, keepdim=True).values)  # never drop every source
            self.active &= keep
            w = w.masked_fill(~self.active, 0.0)
            w = w / w.sum(dim=1, keepdim=True)
        if self.record:
            self._trajectory.append(w.detach().cpu())
            self._times.append(t.detach().cpu())
        return (w.to(eps.dtype).view(b, n, *([1] * (x.ndim - 1))) * eps).sum(dim=1)
