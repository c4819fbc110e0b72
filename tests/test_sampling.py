"""Every solver, through one shared test class, on targets with an analytic epsilon."""

import math

import pytest
import torch

from cdm.sampling import (
    SCHEDULES,
    SOLVERS,
    NoiseSchedule,
    classifier_free_guidance,
    sample,
)


def gaussian_eps(mu: torch.Tensor, s: float, schedule: NoiseSchedule):
    """Exact eps for data N(mu, s^2 I): eps*(x, t) = sqrt(1-a) (x - sqrt(a) mu) / (a s^2 + 1 - a)."""
    abar = schedule.alphas_cumprod.float()

    def eps(x, t, **cond):
        a = abar[t].view(-1, *([1] * (x.ndim - 1)))
        return (1 - a).sqrt() * (x - a.sqrt() * mu) / (a * s**2 + 1 - a)

    return eps


# cdm's own schedules; U-ViT's (vpsde, ddpm_linear) have their alphas checked against the formulas below, and
# vpsde (betas of its own) runs through every solver there
SOLVER_SCHEDULES = sorted(set(SCHEDULES) - {"vpsde", "ddpm_linear"})


@pytest.mark.parametrize("solver", sorted(SOLVERS))
@pytest.mark.parametrize("schedule_name", SOLVER_SCHEDULES)
class TestSolver:
    def test_reproduces_a_gaussian(self, solver, schedule_name):
        schedule = NoiseSchedule(schedule_name)
        mu = torch.tensor([0.3, -0.2, 0.0, 0.1]).view(1, 4, 1, 1)
        noise = torch.randn(4000, 4, 1, 1, generator=torch.Generator().manual_seed(0))
        eps = gaussian_eps(mu, 0.2, schedule)
        errs = []
        for steps in (20, 1000):  # discretisation error shrinks; at 1000 steps the spread is right
            x = sample(eps, noise, schedule=schedule, solver=solver, steps=steps, clip=False)
            assert torch.allclose(x.mean(0), mu[0], atol=0.02)
            errs.append(abs((x - mu).std().item() - 0.2))
        assert errs[1] < 0.008 and errs[1] < errs[0]

    def test_deterministic_and_callback(self, solver, schedule_name):
        schedule = NoiseSchedule(schedule_name)
        eps = gaussian_eps(torch.zeros(1, 1, 2, 2), 0.5, schedule)
        noise = torch.randn(8, 1, 2, 2, generator=torch.Generator().manual_seed(1))
        seen = []
        g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
        a = sample(eps, noise, schedule=schedule, solver=solver, steps=10, generator=g(),
                   callback=lambda i, t, x: seen.append(int(t[0])))
        b = sample(eps, noise, schedule=schedule, solver=solver, steps=10, generator=g())
        assert torch.equal(a, b)
        assert len(seen) == 10 and seen[0] == schedule.num_train_timesteps - 1 and seen == sorted(seen, reverse=True)

    def test_clipping_keeps_samples_in_range(self, solver, schedule_name):
        schedule = NoiseSchedule(schedule_name)
        eps = gaussian_eps(torch.full((1, 1, 2, 2), 0.9), 0.5, schedule)  # much of the mass lies beyond 1
        noise = torch.randn(256, 1, 2, 2, generator=torch.Generator().manual_seed(2))
        x = sample(eps, noise, schedule=schedule, solver=solver, steps=20, clip=True)
        assert x.abs().max() <= 1.0 + 1e-4

    def test_accepts_any_callable_and_bf16(self, solver, schedule_name):
        schedule = NoiseSchedule(schedule_name)
        calls = []

        def eps(x, t, *, y):
            calls.append((x.shape[0], y.shape[0]))
            return torch.zeros_like(x)

        noise = torch.randn(3, 1, 2, 2)
        x = sample(eps, noise, schedule=schedule, solver=solver, steps=5, cond={"y": torch.arange(3)}, bf16=True)
        assert x.shape == noise.shape and x.dtype == torch.float32 and calls == [(3, 3)] * 5


def test_classifier_free_guidance_is_one_batched_call():
    calls = []

    def eps(x, t, *, y):
        calls.append(x.shape[0])
        return y.float().view(-1, 1, 1, 1).expand_as(x)

    guided = classifier_free_guidance(eps, 3.0, {"y": 10})
    out = guided(torch.zeros(2, 1, 1, 1), torch.tensor([5, 5]), y=torch.tensor([1, 2]))
    assert calls == [4]
    # e_u + 3 (e_c - e_u) with e_u = 10
    assert out.flatten().tolist() == [10 + 3 * (1 - 10), 10 + 3 * (2 - 10)]
    assert classifier_free_guidance(eps, 1.0, {"y": 10}) is eps


def test_bad_arguments():
    s = NoiseSchedule()
    with pytest.raises(ValueError, match="unknown solver"):
        sample(lambda x, t: x, torch.zeros(1, 1, 1, 1), schedule=s, solver="euler")
    with pytest.raises(ValueError, match="steps"):
        sample(lambda x, t: x, torch.zeros(1, 1, 1, 1), schedule=s, steps=0)
    with pytest.raises(ValueError, match="unknown noise schedule"):
        NoiseSchedule("sigmoid")


def test_add_noise_matches_the_marginal():
    s = NoiseSchedule()
    x0 = torch.full((20000, 1), 0.5)
    t = torch.full((20000,), 500)
    xt = s.add_noise(x0, torch.randn(20000, 1, generator=torch.Generator().manual_seed(0)), t)
    a = s.alphas_cumprod[500].item()
    assert abs(xt.mean().item() - math.sqrt(a) * 0.5) < 0.02 and abs(xt.std().item() - math.sqrt(1 - a)) < 0.02


def test_ancestral_solver_is_finite_at_every_step_count_and_matches_diffusers():
    from cdm.sampling.solvers import _ddim

    sched = NoiseSchedule()
    eps = lambda x, t, **_: 0.5 * x  # noqa: E731
    for steps in range(1, 13):  # diffusers' DDIM(eta=1) gives NaN at 5 steps (sqrt of a rounding error < 0)
        x = sample(eps, torch.randn(3, 1, 4, 4), schedule=sched, solver="ddpm", steps=steps,
                   generator=torch.Generator().manual_seed(0))
        assert torch.isfinite(x).all(), steps
    noise = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    for clip in (False, True):  # the default (no clipping: the codec decides) and pixel images' clipping
        ours = sample(eps, noise, schedule=sched, solver="ddpm", steps=6, generator=torch.Generator().manual_seed(0),
                      clip=clip)
        ref, _ = _ddim(sched, clip)
        ref.set_timesteps(6)
        g, y = torch.Generator().manual_seed(0), noise.clone()
        for t in ref.timesteps:
            y = ref.step(eps(y, t), t, y, eta=1.0, use_clipped_model_output=True, generator=g).prev_sample
        assert torch.allclose(ours, y, atol=1e-4), clip


def test_vpsde_alphas_match_the_continuous_formula():
    """U-ViT's VP-SDE (sde.VPSDE: beta 0.1 -> 20, cum_alpha = exp(-int_0^s beta)) on the grid the network sees:
    integer t is their continuous s = t / 999 (they feed the network s * 999)."""
    from cdm.sampling.schedule import VPSDE_S0

    abar = NoiseSchedule("vpsde").alphas_cumprod  # through diffusers (trained_betas, float32 cumprod)
    s = torch.arange(1000, dtype=torch.float64) / 999
    s[0] = VPSDE_S0  # t = 0 would be s = 0, abar = 1 (no noise): the grid uses their smallest sampling time
    want = torch.exp(-(0.1 * s + (20 - 0.1) * s**2 / 2))
    torch.testing.assert_close(abar, want, rtol=2e-6, atol=0)
    # the mean coefficient sqrt(abar) in Song et al.'s form, and the two ends
    torch.testing.assert_close(abar.sqrt(), torch.exp(-(20 - 0.1) * s**2 / 4 - 0.1 * s / 2), rtol=2e-6, atol=0)
    assert abs(abar[999].item() - math.exp(-10.05)) < 1e-9 and 0.9998 < abar[0].item() < 1
    assert abar[1].item() == pytest.approx(math.exp(-(0.1 / 999 + 19.9 / 999**2 / 2)), rel=1e-6)


def test_ddpm_linear_alphas_match_the_formula():
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    torch.testing.assert_close(NoiseSchedule("ddpm_linear").alphas_cumprod, torch.cumprod(1 - betas, 0), rtol=2e-5,
                               atol=0)


@pytest.mark.parametrize("solver", sorted(SOLVERS))
def test_vpsde_reproduces_a_gaussian_and_is_finite_at_t0(solver):
    """1000 steps visit t = 0, where abar_0 = 1 (s = 0) made every solver divide 0 by 0."""
    sched = NoiseSchedule("vpsde")
    mu = torch.tensor([0.3, -0.2]).view(1, 2, 1, 1)
    eps = gaussian_eps(mu, 0.2, sched)
    noise = torch.randn(1000, 2, 1, 1, generator=torch.Generator().manual_seed(0))
    x = sample(eps, noise, schedule=sched, solver=solver, steps=1000, generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(x).all() and torch.allclose(x.mean(0), mu[0], atol=0.03)
    assert abs((x - mu).std().item() - 0.2) < 0.01
