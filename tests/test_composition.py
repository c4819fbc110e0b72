"""Composition on a case with a known answer: a 2-D Gaussian mixture whose per-component epsilon and density
are analytic. Oracle and Ito weights reproduce the mixture; the naive average does not."""

import math

import pytest
import torch

from cdm.composition import ComposedDenoiser, ItoWeighting, NaiveWeighting, OracleWeighting, SingleWeighting
from cdm.sampling import NoiseSchedule, sample

SCHEDULE = NoiseSchedule("cosine")
ABAR = SCHEDULE.alphas_cumprod.float()
MEANS = torch.tensor([[-0.6, 0.0], [0.5, 0.4]])
STD = 0.08
PRIORS = [0.3, 0.7]


def _a(t, x):
    return ABAR[t].view(-1, *([1] * (x.ndim - 1)))


def component_eps(mu):
    mu = mu.view(1, 2, 1, 1)

    def eps(x, t, **cond):
        a = _a(t, x)
        return (1 - a).sqrt() * (x - a.sqrt() * mu) / (a * STD**2 + 1 - a)

    return eps


def component_log_density(mu):
    mu = mu.view(1, 2, 1, 1)

    def log_p(x, t):
        a = _a(t, x)
        var = a * STD**2 + 1 - a
        return (-(x - a.sqrt() * mu).pow(2) / (2 * var) - 0.5 * torch.log(2 * math.pi * var)).flatten(1).sum(1)

    return log_p


def draw(weighting, solver, n=3000, steps=200, threshold=0.0, seed=0):
    comp = ComposedDenoiser([component_eps(m) for m in MEANS], weighting, priors=PRIORS, threshold=threshold)
    noise = torch.randn(n, 2, 1, 1, generator=torch.Generator().manual_seed(seed))
    x = sample(comp, noise, schedule=SCHEDULE, solver=solver, steps=steps, clip=False,
               generator=torch.Generator().manual_seed(seed + 1))
    return x.view(n, 2), comp


def mixture_stats(x):
    d = torch.cdist(x, MEANS)
    k = d.argmin(1)
    near = d.min(1).values < 4 * STD
    return k, near


def check_reproduces_mixture(x, prop_tol=0.04):
    k, near = mixture_stats(x)
    assert near.float().mean() > 0.97
    share = (k == 1).float().mean().item()
    assert abs(share - PRIORS[1]) < prop_tol
    for j in range(2):
        xs = x[(k == j) & near]
        assert torch.allclose(xs.mean(0), MEANS[j], atol=0.02)
        assert abs(xs.std(0).mean().item() - STD) < 0.02


@pytest.mark.parametrize("solver", ["ddim", "ddpm"])
def test_oracle_weights_reproduce_the_mixture(solver):
    x, _ = draw(OracleWeighting([component_log_density(m) for m in MEANS]), solver)
    check_reproduces_mixture(x)


def test_ito_weights_reproduce_the_mixture():
    x, comp = draw(ItoWeighting(SCHEDULE), "ddpm", steps=500)
    check_reproduces_mixture(x, prop_tol=0.05)
    w = comp.trajectory()
    assert w.shape == (500, 3000, 2)
    assert torch.allclose(w[0], torch.tensor(PRIORS, dtype=torch.float64).expand(3000, 2))  # starts at lambda
    assert (w[-1].max(1).values > 0.99).float().mean() > 0.95  # ends committed to one source


def test_naive_average_makes_hybrids():
    x, _ = draw(NaiveWeighting(), "ddpm")
    _, near = mixture_stats(x)
    assert near.float().mean() < 0.5


def test_single_draws_one_source_per_sample_and_costs_one_eval():
    x, comp = draw(SingleWeighting(torch.Generator().manual_seed(5)), "ddim", n=2000, steps=50)
    check_reproduces_mixture(x)
    assert comp.evals == 2000 * 50


def test_sparse_gating_cuts_evaluations_and_keeps_the_mixture():
    oracle = lambda: OracleWeighting([component_log_density(m) for m in MEANS])  # noqa: E731
    x_dense, dense = draw(oracle(), "ddim", steps=100)
    x_sparse, sparse = draw(oracle(), "ddim", steps=100, threshold=1e-2)
    assert dense.evals == 3000 * 2 * 100
    assert sparse.evals < 0.92 * dense.evals  # measured 0.89: the deterministic path commits late
    check_reproduces_mixture(x_sparse)
    assert (x_dense - x_sparse).abs().max() < 0.01


def test_plain_functions_compose_and_bad_priors_are_refused():
    f = lambda x, t: torch.ones_like(x)  # noqa: E731
    g = lambda x, t: -torch.ones_like(x)  # noqa: E731
    comp = ComposedDenoiser([f, g], NaiveWeighting(), priors=[3, 1])
    out = comp(torch.zeros(4, 1, 2, 2), torch.full((4,), 10))
    assert torch.allclose(out, torch.full_like(out, 0.5))
    for bad in ([1], [-1, 2], [0, 0], [float("nan"), 1]):
        with pytest.raises(ValueError, match="priors"):
            ComposedDenoiser([f, g], NaiveWeighting(), priors=bad)


def test_compartment_bank_matches_separate_calls():
    from cdm.backbone import Backbone, UViT, UViTConfig
    from cdm.compartments import Compartment, CompartmentConfig
    from cdm.composition import CompartmentBank

    torch.manual_seed(0)
    bb = Backbone(UViT(UViTConfig(img_size=14, patch_size=7, embed_dim=16, depth=3, num_heads=2))).freeze()
    comps = []
    for s in range(3):
        c = Compartment.for_backbone(bb, CompartmentConfig(n_prompts=2))
        c.init_prompts(torch.Generator().manual_seed(s))
        comps.append(c)
    bank = CompartmentBank(bb, comps)
    x, t = torch.randn(5, 1, 14, 14), torch.tensor([1, 200, 500, 800, 999])
    y, index = torch.tensor([0, 3, 10, 7, 9]), torch.tensor([2, 0, 1, 1, 2])
    with torch.no_grad():
        batched = bank(x, t, index, y=y)
        one_by_one = torch.cat([comps[int(i)].eps(bb, x[r:r + 1], t[r:r + 1], y[r:r + 1]) for r, i in enumerate(index)])
    torch.testing.assert_close(batched, one_by_one, atol=1e-5, rtol=1e-4)
    composed = ComposedDenoiser(bank, NaiveWeighting())
    with torch.no_grad():
        out = composed(x, t, y=y)
    assert out.shape == x.shape and composed.evals == 15


def test_class_priors_route_each_class_to_the_sources_that_hold_it():
    a = lambda x, t, **_: torch.full_like(x, 1.0)  # noqa: E731
    b = lambda x, t, **_: torch.full_like(x, -1.0)  # noqa: E731
    comp = ComposedDenoiser([a, b], NaiveWeighting(), priors=[1.0, 3.0],
                            class_priors=[[5, 0, 2], [0, 5, 2]])  # class 0 only in a, 1 only in b, 2 in both
    x, t = torch.zeros(4, 1, 2, 2), torch.full((4,), 500)
    y = torch.tensor([0, 1, 2, 9])  # 9: not a class of the table (the null label) -> the global priors
    out = comp(x, t, y=y)
    assert torch.equal(out[0], torch.ones(1, 2, 2)) and torch.equal(out[1], -torch.ones(1, 2, 2))
    assert torch.allclose(out[2], torch.zeros(1, 2, 2), atol=1e-6)  # 2 vs 2 samples: equal weights
    assert torch.allclose(out[3], torch.full((1, 2, 2), 0.25 - 0.75), atol=1e-6)  # lambda = 1/4, 3/4
    assert comp.evals == 6  # rows 0 and 1 evaluated one source only
    with pytest.raises(ValueError, match="class_priors"):
        ComposedDenoiser([a, b], NaiveWeighting(), class_priors=[[1, 2, 3]])


def test_default_sampling_does_not_clip_data_outside_the_pixel_range():
    """Clipping x0 to [-1, 1] belongs to an image codec, not to the solver: three 2-D Gaussians far outside
    [-1, 1], composed and sampled with the solver's defaults, come out as the mixture (clipping made 100%
    hybrids)."""
    means = torch.tensor([[-3.0, 0.0], [3.0, 1.0], [0.0, -3.0]])
    priors = [0.2, 0.3, 0.5]
    comp = ComposedDenoiser([component_eps(m) for m in means],
                            OracleWeighting([component_log_density(m) for m in means]), priors=priors)
    noise = torch.randn(1500, 2, 1, 1, generator=torch.Generator().manual_seed(0))
    x = sample(comp, noise, schedule=SCHEDULE, solver="ddim", steps=100).view(-1, 2)
    d = torch.cdist(x, means)
    assert (d.min(1).values < 4 * STD).float().mean() > 0.97  # no hybrids
    shares = torch.bincount(d.argmin(1), minlength=3).double() / len(x)
    assert torch.allclose(shares, torch.tensor(priors, dtype=torch.float64), atol=0.04)
