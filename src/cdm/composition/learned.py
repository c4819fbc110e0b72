"""Learned composition weights: heads that estimate which source a noisy ``x_t`` came from.

Three learned weightings plug into :class:`~cdm.composition.ComposedDenoiser` (registered in
:mod:`cdm.composition.registry`):

- ``router`` (the CDM paper's): one small attention-pooling head per compartment reads the mid-block tokens of
  *that compartment's* forward (which the composed denoiser computes anyway, so the weights cost one tiny
  head per pair) and returns one logit; the n heads are trained JOINTLY with cross-entropy on
  ``(x_t from source k, label k)``. Needs every source's data at once, so adding or forgetting any source
  means retraining it.
- ``isolated`` (not in the paper): the same heads, but head i is trained ONLY on source i against a shared
  public core set, as a binary density-ratio estimator (see :class:`IsolatedWeighting`). A head belongs to its
  compartment: adding a source trains one new head, forgetting one deletes one head, no other head changes.
- ``classifier``: a separate small noisy classifier ``f(x_t, t)`` over the sources (Prop. 3.2 of the paper),
  a CNN on the model-space image with a sinusoidal time embedding; not tied to the backbone's forward.

The heads themselves are in :mod:`cdm.composition.heads`, their training (balanced batches, seeded draws) in
:mod:`cdm.composition.head_training`. A weighting's module follows the tensors it reads: it is moved (once, in
place) to the device of the mid tokens or samples it is given, e.g. the backbone's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .heads import HeadBank, NoisyClassifier

__all__ = ["ClassifierWeighting", "IsolatedWeighting", "RouterWeighting"]


class RouterWeighting:
    """The paper's router: logits ``heads(mid)``, head i on the mid tokens of compartment i's forward.

    Trained jointly with cross-entropy on balanced batches (:func:`~cdm.composition.train_router`), its logits are
    ``log p_t^i(x) + c(x)``; the composed denoiser adds ``log lambda`` and softmaxes."""

    name = "router"
    needs_mid = True

    def __init__(self, heads: HeadBank):
        self.heads = heads.eval().requires_grad_(False)

    def reset(self) -> None:
        pass

    @torch.no_grad()
    def log_likelihood(self, x, t, eps, active, log_prior, mid=None, **extra):
        if mid is None:
            raise ValueError(f"the {self.name} weighting reads mid-block tokens: compose through a CompartmentBank")
        p = next(self.heads.parameters())
        if p.device != mid.device:
            self.heads.to(mid.device)
        return self.heads(mid.to(p.dtype), active.to(mid.device)).double()


class IsolatedWeighting(RouterWeighting):
    """Per-compartment density-ratio heads, each trained on its own source and the public core only.

    Head i is a binary logistic classifier on the mid tokens of compartment i's forward, trained on noisy
    samples ``x_t`` of source i (label 1) against noisy samples of a public core set (label 0), the two classes
    equally often, with ``t`` drawn the same way for both. For balanced classes the minimiser of the logistic
    loss is the log-odds of the Bayes posterior,

        f_i(x, t) = log P(label 1 | x_t = x, t) - log P(label 0 | x_t = x, t) = log p_t^i(x) - log p_t^core(x),

    (where the head's features are rich enough to express it: the density ratio is then a function of them).
    The core is the SAME distribution for every head. Hence, for the active sources,

        softmax_i(log lambda_i + f_i(x, t)) = lambda_i p_t^i(x) / p_t^core(x) / sum_j lambda_j p_t^j(x) / p_t^core(x)
                                           = lambda_i p_t^i(x) / sum_j lambda_j p_t^j(x) = w_i(x, t):

    ``p_t^core(x)`` is one factor shared by every term and cancels, so independently trained heads give the
    composition posterior (Prop. 3.1) without any head ever seeing another source. Noise makes the ratio
    well defined: ``p_t^core > 0`` everywhere for ``t > 0`` (a Gaussian convolution), although far from the
    core's support the estimate rests on the head's extrapolation. Heads trained against different cores do
    not compose (``compose`` refuses them).
    """

    name = "isolated"


class ClassifierWeighting:
    """A separate noisy classifier ``f(x_t, t)`` (:class:`NoisyClassifier`): logits ``f(x, t)[:, columns]``.

    ``columns`` picks (and orders) the composed sources among those the classifier was trained on: trained on
    balanced batches its logits are ``log p_t^k(x) + c(x)``, so a softmax over a subset is the sub-mixture's
    posterior. The classifier sees ``x_t`` only, never the class label of a class-conditional sample."""

    name = "classifier"
    needs_mid = False

    def __init__(self, model: NoisyClassifier, columns: Sequence[int] | None = None):
        self.model = model.eval().requires_grad_(False)
        self.columns = None if columns is None else torch.as_tensor(list(columns), dtype=torch.long)

    def reset(self) -> None:
        pass

    @torch.no_grad()
    def log_likelihood(self, x, t, eps, active, log_prior, **extra):
        p = next(self.model.parameters())
        if p.device != x.device:
            self.model.to(x.device)
        logits = self.model(x.to(p.dtype), t.to(x.device)).double()
        return logits if self.columns is None else logits[:, self.columns.to(logits.device)]
