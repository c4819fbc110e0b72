"""Credit attribution: divergence vs an exact Jacobian trace, the decomposition vs an analytic mixture."""

import math

import numpy as np
import pytest
import torch

from cdm.attribution import attribute, divergence, normalised_entropy, weight_path_credit
from cdm.compartments import Compartment, CompartmentConfig
from cdm.composition import CompartmentBank
from cdm.sampling import NoiseSchedule


def test_divergence_exact_and_hutchinson_match_jacobian_trace(backbone):
    comp = Compartment.for_backbone(backbone, CompartmentConfig(n_prompts=2, conditional=False))
    comp.init_prompts(torch.Generator().manual_seed(0))
    x = torch.randn(2, 1, 14, 14, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([300, 700])

    def f(z):
        return comp.eps(backbone, z, t)

    jac = torch.autograd.functional.jacobian(f, x, vectorize=True).reshape(2, 196, 2, 196)
    trace = torch.stack([jac[i, :, i].trace() for i in range(2)]).double()
    exact = divergence(f, x, exact=True)
    assert torch.allclose(exact, trace, rtol=1e-5, atol=1e-4)
    est = divergence(f, x, probes=32, generator=torch.Generator().manual_seed(2))
    se = est.std(0) / 32**0.5
    assert ((est.mean(0) - trace).abs() <= 5 * se + 1e-6).all()


MU, S = 1.5, 0.3  # two sources: N(+MU, S^2 I) and N(-MU, S^2 I) in 4 dimensions


def _gauss(sign: float, schedule: NoiseSchedule):
    abar = schedule.alphas_cumprod

    def eps(x, t, **_):
        a = abar[t].view(-1, 1, 1, 1).to(x.dtype)
        var = a * S**2 + (1 - a)
        return (1 - a).sqrt() * (x - a.sqrt() * sign * MU) / var

    return eps


def _log_mixture(x: torch.Tensor, a: float) -> torch.Tensor:
    var = a * S**2 + (1 - a)
    d = x[0].numel()
    parts = [-(x.flatten(1).double() - math.sqrt(a) * s * MU).pow(2).sum(1) / (2 * var) for s in (1, -1)]
    return torch.logsumexp(torch.stack(parts), 0) + math.log(0.5) - d / 2 * math.log(2 * math.pi * var)


def test_decomposition_sums_to_the_mixture_log_likelihood_and_credits_the_right_source():
    sched = NoiseSchedule()
    bank = [_gauss(1.0, sched), _gauss(-1.0, sched)]
    x_T = torch.randn(6, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    r = attribute(bank, x_T, schedule=sched, steps=200, exact=True, abar_floor=0.0)
    x0 = torch.as_tensor(r["x0"])
    a_T = float(sched.alphas_cumprod[999])
    truth = (_log_mixture(x0, 1.0) - _log_mixture(x_T, a_T)).numpy()
    assert np.allclose(r["loglik_change"], truth, rtol=0.06)  # left Riemann sum on the DDIM path: ~4% low
    side = (x0.flatten(1).mean(1) < 0).long().numpy()  # which Gaussian each sample ended in
    assert (r["credit"].argmax(1) == side).all() and (r["credit"].max(1) > 0.9).all()
    assert (r["weight_path"].argmax(1) == side).all()
    assert np.isnan(r["credit_se"]).all()  # exact: no Monte Carlo error
    h = attribute(bank, x_T, schedule=sched, steps=20, probes=3, seed=1, abar_floor=0.0)
    assert np.isfinite(h["credit_se"]).all() and (h["credit_se"] >= 0).all()


def test_compartment_bank_attribution_runs_and_helpers(backbone):
    comps = []
    for seed in (0, 1):
        c = Compartment.for_backbone(backbone, CompartmentConfig(n_prompts=2, conditional=False))
        c.init_prompts(torch.Generator().manual_seed(seed))
        comps.append(c)
    r = attribute(CompartmentBank(backbone, comps), torch.randn(3, 1, 14, 14), schedule=backbone.schedule, steps=3)
    assert r["credit"].shape == (3, 2) and np.allclose(r["credit"].sum(1), 1)
    assert r["weights"].shape == (3, 3, 2) and np.allclose(r["weight_path"].sum(1), 1, atol=1e-5)
    assert np.allclose(normalised_entropy(np.array([[1.0, 0.0], [0.5, 0.5]])), [0.0, 1.0])
    w = np.array([[[1.0, 0.0]], [[0.0, 1.0]]])
    assert np.allclose(weight_path_credit(w, np.array([[999], [499]])), [[500 / 999, 499 / 999]], atol=1e-6)
    with pytest.raises(ValueError, match="ito"):
        from cdm.composition import ItoWeighting

        attribute(CompartmentBank(backbone, comps), torch.randn(1, 1, 14, 14), schedule=backbone.schedule,
                  weighting=ItoWeighting(backbone.schedule))
