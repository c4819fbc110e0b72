"""Credit attribution: divergence vs an exact Jacobian trace, the decomposition vs an analytic mixture."""

import math

import numpy as np
import pytest
import torch

from cdm.attribution import attribute, divergence, normalised_entropy, weight_path_credit
from cdm.compartments import Compartment, CompartmentConfig
from cdm.composition import ClassMixtureBank, CompartmentBank
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


def _gauss_at(mean: torch.Tensor, schedule: NoiseSchedule):
    """eps of N(mean, S^2 I) under the VP forward process (mean shaped like one sample)."""
    abar = schedule.alphas_cumprod

    def eps(x, t, **_):
        a = abar[t].view(-1, 1, 1, 1).to(x.dtype)
        return (1 - a).sqrt() * (x - a.sqrt() * mean) / (a * S**2 + (1 - a))

    return eps


def test_grouped_components_sum_to_their_source_and_track_the_finer_mixture():
    """Two sources, each a mixture of two Gaussians (the class-mixture case): grouped credits are the sums of the
    component credits of the same run, the tracked likelihood is the 4-component mixture's, and each sample's
    credit goes to the source whose half of the space it ended in."""
    sched = NoiseSchedule()
    signs = [(1, 1), (1, -1), (-1, 1), (-1, -1)]  # (source sign on dims 0-1, component sign on dims 2-3)
    means = [MU * torch.tensor([a, a, b, b], dtype=torch.float32).view(1, 2, 2) for a, b in signs]
    bank = [_gauss_at(m, sched) for m in means]
    x_T = torch.randn(8, 1, 2, 2, generator=torch.Generator().manual_seed(3))
    groups = [0, 0, 1, 1]
    fine = attribute(bank, x_T, schedule=sched, steps=1000, exact=True, abar_floor=0.0)
    grouped = attribute(bank, x_T, schedule=sched, steps=1000, exact=True, abar_floor=0.0, groups=groups)
    assert np.allclose(grouped["x0"], fine["x0"])  # grouping changes the report, not the path
    summed = np.stack([fine["L"][:, :2].sum(1), fine["L"][:, 2:].sum(1)], 1)
    assert np.allclose(grouped["L"], summed) and grouped["credit"].shape == (8, 2)
    assert np.allclose(grouped["weight_path"], np.stack([fine["weight_path"][:, :2].sum(1),
                                                         fine["weight_path"][:, 2:].sum(1)], 1), atol=1e-6)
    x0 = torch.as_tensor(fine["x0"]).flatten(1).double()
    var0, var_T = S**2, float(sched.alphas_cumprod[999]) * S**2 + 1 - float(sched.alphas_cumprod[999])

    def log_mix(x, a, var):
        parts = [-(x - math.sqrt(a) * m.flatten().double()).pow(2).sum(1) / (2 * var) for m in means]
        return torch.logsumexp(torch.stack(parts), 0) - math.log(4) - 2 * math.log(2 * math.pi * var)

    truth = log_mix(x0, 1.0, var0) - log_mix(torch.as_tensor(x_T).flatten(1).double(),
                                             float(sched.alphas_cumprod[999]), var_T)
    assert np.abs(grouped["loglik_change"] - truth.numpy()).max() < 0.1  # nats; 200 steps: up to 0.3 low
    side = (x0[:, :2].mean(1) < 0).long().numpy()
    assert (grouped["credit"].argmax(1) == side).all() and (grouped["weight_path"].argmax(1) == side).all()
    with pytest.raises(ValueError, match="groups"):
        attribute(bank, x_T, schedule=sched, steps=2, exact=True, groups=[0, 1])
    from cdm.composition import OracleWeighting

    with pytest.raises(ValueError, match="mixture components"):
        attribute(bank, x_T, schedule=sched, steps=2, exact=True, groups=groups, weighting=OracleWeighting([]))


def test_class_mixture_bank_routes_components_to_their_compartment_and_class(backbone):
    comps = []
    for seed in (0, 1):
        c = Compartment.for_backbone(backbone, CompartmentConfig(n_prompts=2, conditional=True))
        c.init_prompts(torch.Generator().manual_seed(seed))
        with torch.no_grad():  # open the gates so that classes and compartments differ
            c.prompts.table.weight[:, c.prompts.n_prompt_numbers:] = 0.5
        comps.append(c)
    classes = comps[0].num_classes
    counts = np.zeros((2, classes))
    counts[0, :2] = [30, 10]  # source 0: classes 0 and 1
    counts[1, 5] = 7  # source 1: class 5 only
    mix = ClassMixtureBank(CompartmentBank(backbone, comps), counts)
    assert len(mix) == 3 and mix.source.tolist() == [0, 0, 1] and mix.label.tolist() == [0, 1, 5]
    assert np.allclose(mix.priors(), [0.75, 0.25, 1.0]) and np.allclose(mix.priors([2.0, 1.0]), [1.5, 0.5, 1.0])
    x = torch.randn(3, 1, 14, 14, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([100, 500, 900])
    out = mix(x, t, torch.tensor([0, 1, 2]))
    for row, (i, y) in enumerate([(0, 0), (0, 1), (1, 5)]):
        want = comps[i].eps(backbone, x[row:row + 1], t[row:row + 1], torch.tensor([y]))
        assert torch.allclose(out[row:row + 1], want, atol=1e-6)
    r = attribute(mix, torch.randn(2, 1, 14, 14), schedule=backbone.schedule, priors=mix.priors(), steps=2)
    assert r["credit"].shape == (2, 2) and r["weights"].shape == (2, 2, 2)  # per source, not per component
    assert np.allclose(r["weights"].sum(-1), 1, atol=1e-5)
    with pytest.raises(ValueError, match="no label"):
        mix(x, t, torch.tensor([0, 1, 2]), y=torch.tensor([1, 1, 1]))
    with pytest.raises(ValueError, match="no labelled sample"):
        ClassMixtureBank(CompartmentBank(backbone, comps), np.zeros((2, classes)))
    with pytest.raises(ValueError, match="shaped"):
        ClassMixtureBank(CompartmentBank(backbone, comps), counts[:, :3])
    unconditional = Compartment.for_backbone(backbone, CompartmentConfig(n_prompts=2, conditional=False))
    with pytest.raises(ValueError, match="class-conditional"):
        ClassMixtureBank(CompartmentBank(backbone, [unconditional]), counts[:1])
