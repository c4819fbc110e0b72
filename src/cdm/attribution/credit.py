"""Credit attribution of generated samples to the sources whose compartments made them.

Two views, computed along the same deterministic path (DDIM with eta = 0, i.e. the probability-flow ODE of
the VP diffusion, no x_0 clipping):

**Likelihood decomposition** (the CDM paper, Sec. 5). With the composed field ``v = sum_i w_i v_i``
(``w_i`` here includes the prior: ``w_i = lambda_i p_t^i / p_t``) and ``dx/dt = v``, the change of variables
gives ``log p_0(x_0) - log p_1(x_1) = int_0^1 div v dt = sum_i L_i`` with ``L_i = int div(w_i v_i) dt``, and
the credit of source i is ``C_i = L_i / sum_j L_j`` (the paper writes ``lambda_i L_i`` with lambda outside w).

For the VP probability-flow field ``v_i = -(beta/2) (x + s_i)``, ``s_i = -eps_i / sigma_t``. Because
``grad w_i = w_i (s_i - s_bar)`` when w is the posterior (``s_bar = sum_j w_j s_j``, the mixture score),

    div(w_i v_i) = w_i [ div v_i + <s_i - s_bar, v_i> ]
                 = -(beta/2) w_i [ d - div(eps_i) / sigma + <s_i - s_bar, x + s_i> ],

so only ``div eps_i`` (one Jacobian trace per compartment) is needed, not derivatives of the weights. Per
step ``int beta dt = log abar(t_next) - log abar(t)``. ``div eps_i`` comes from a Hutchinson estimator
``E[z^T J z]`` with Rademacher probes drawn from a seeded generator (the same probes for every source, so
source differences are estimated with correlated noise), or exactly (d backward passes; small d only).
Standard error: each probe gives its own full path integral ``L_i^(p)``; ``se = std_p / sqrt(P)``.

``C_i`` is a ratio of signed integrals: the ``<s_i - s_bar, ...>`` term can be negative for a source whose
weight is falling, so a credit can leave [0, 1] (the total is ``log p_0 - log p_1``, positive for images,
which concentrate). Shares quoted as "top-credit" or entropies use credits clipped at 0 and renormalised.

**Weight path**: ``W_i = int_0^1 w_i(x_t, t) dt`` along the same path (uniform in the model's time). It says
who steered the sampler, and for how long.

When they disagree: the weight path counts time spent, equally early (pure noise, w ~ lambda) and late; the
likelihood credit counts where the density concentrates, which for images is the low-noise end, after the
posterior has committed. So for disjoint domains both pick the same source but the likelihood credit is far
more skewed; for splits of one domain the weights stay near lambda for a long time and the weight path is
spread, while the likelihood credit follows the source that was chosen at the end and the source whose weight
fell gets a negative transfer term. A source with a small prior but a decisive late role can win the
likelihood credit and lose the weight path.

Mixtures of components: when a source's density is itself a mixture (a class-conditional compartment's
classes, :class:`~cdm.composition.ClassMixtureBank`), the bank's rows are the components, the posterior is
tracked over them, and ``w_i``, ``L_i`` of a source are the sums over its components (both are additive, since
``div(w_i v_i) = sum_y div(w_iy v_iy)`` when ``w_i v_i = sum_y w_iy v_iy``).

Weights along the path: ``ode`` (default) tracks ``log p_t^i(x_t)`` along the ODE path itself, by the
continuity equation of each source, ``d log p^i = (-div v_i + <s_i, v - v_i>) dt``, with the same divergences
(the deterministic counterpart of the Ito estimator, which needs a stochastic path and is refused here). Any
weighting that is a function of (x, t) works too (``router``, ``classifier``, ``isolated``, ``oracle``); the
decomposition then uses the posterior identity above, exact when the weighting is the posterior of the
compartments' own densities and an approximation otherwise.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from ..sampling import NoiseSchedule

__all__ = ["attribute", "divergence", "normalised_entropy", "weight_path_credit"]


def divergence(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, *, probes: int = 1, exact: bool = False,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """Divergence of ``f`` (batch-separable, ``f(x)`` shaped like ``x``) at each row of ``x``: exact
    ``(B,)`` or Hutchinson ``(P, B)`` with Rademacher probes (drawn on the CPU from ``generator``, then moved to
    ``x``'s device, like every random draw in cdm)."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        y = f(x)
        flat = x[0].numel()
        if exact:  # every basis direction at once (vmap over grad_outputs), in chunks
            out = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
            eye = torch.eye(flat, dtype=x.dtype, device=x.device)
            for s in range(0, flat, 64):
                e = eye[s:s + 64].view(-1, 1, *x.shape[1:]).expand(-1, *x.shape).contiguous()
                (g,) = torch.autograd.grad(y, x, e, retain_graph=True, is_grads_batched=True)
                out += (g * e).flatten(2).sum(2).sum(0).double()
            return out
        out = []
        for p in range(probes):
            z = torch.randint(0, 2, x.shape, generator=generator).to(x.device, x.dtype) * 2 - 1
            (g,) = torch.autograd.grad(y, x, z, retain_graph=p < probes - 1)
            out.append((g * z).flatten(1).sum(1).double())
        return torch.stack(out)


def _timesteps(schedule: NoiseSchedule, steps: int) -> list[int]:
    from diffusers import DDIMScheduler

    s = DDIMScheduler(**schedule.scheduler_kwargs(), timestep_spacing="trailing")
    s.set_timesteps(steps)
    return [int(t) for t in s.timesteps]


def attribute(bank, x_T: torch.Tensor, *, schedule: NoiseSchedule, priors: Sequence[float] | None = None,
              weighting=None, steps: int = 25, probes: int = 2, exact: bool = False, seed: int = 0,
              cond: dict | None = None, abar_floor: float = 1e-3, clip: bool = False,
              groups: Sequence[int] | torch.Tensor | None = None, x0_range: float | None = 1.0,
              device: torch.device | str | None = None) -> dict:
    """Generate from ``x_T`` along the probability-flow ODE of the composition of ``bank`` (a
    :class:`~cdm.composition.CompartmentBank` or any ``bank(x, t, index, **cond)``) and attribute each sample.

    Returns numpy arrays: ``x0`` (B, ...), ``credit`` (B, n) and ``credit_se``, ``L`` (B, n) and ``L_se`` (nats),
    ``loglik_change`` (B,) = sum_i L_i = log p_0(x_0) - log p_1(x_T), ``weight_path`` (B, n), ``weights``
    (steps, B, n), ``timesteps``. ``weighting``: None (``ode`` tracking) or a weighting object.

    Steps whose ``abar`` is below ``abar_floor`` (with the cosine schedule only the first, t = T - 1 with abar
    ~ 2e-9) add nothing to the integrals: there the exact integrand is O(abar) while ``int beta dt`` over the
    step is ~14, so it would be the network's error at pure noise magnified, not information. The likelihood is
    hence ``log p_0(x_0) - log p_t1(x_t1)`` from the second step's time t1. On such a step the predicted x_0
    is clipped to the data's box ``[-x0_range, x0_range]`` (pixels: [-1, 1], as the shipped DDIM sampler does on
    every step; a latent backbone's codec records its range; None: no clipping); ``clip=True`` does that on every
    step, at the price of leaving the exact ODE.

    ``groups`` maps each row of the bank (a mixture component) to the source it belongs to; the credits, the
    weights and the weight path are then per source (sums over its components: ``L`` and ``w`` are additive).
    Default: the bank's own ``source`` map (a :class:`~cdm.composition.ClassMixtureBank`), else one row per
    source. ``priors`` are per row.

    ``device``: where the path, the divergences and the integrals are computed (default: the bank's ``device``, a
    :class:`~cdm.composition.CompartmentBank`'s being its backbone's; else ``x_T``'s). The probes are drawn on the
    CPU and moved; the results come back as numpy arrays either way.
    """
    if steps < 1 or (not exact and probes < 1):
        raise ValueError("steps and probes must be >= 1")
    if isinstance(bank, (list, tuple)):
        from ..composition import CallableBank

        bank = CallableBank(bank)
    n = len(bank)
    lam = torch.ones(n, dtype=torch.float64) if priors is None else torch.as_tensor(priors, dtype=torch.float64)
    if lam.shape != (n,) or (lam < 0).any() or lam.sum() <= 0:
        raise ValueError(f"priors must be {n} non-negative numbers with a positive sum")
    if weighting is not None and getattr(weighting, "name", "") == "ito":
        raise ValueError("the ito weighting needs a stochastic (ancestral) path; attribution follows the ODE: use "
                         "the default ode tracking or a learned weighting")
    if groups is None:
        groups = getattr(bank, "source", None)
    group = torch.arange(n) if groups is None else torch.as_tensor(groups, dtype=torch.long).reshape(-1)
    if group.shape != (n,) or (group < 0).any():
        raise ValueError(f"groups must map each of the {n} bank rows to a source index >= 0")
    n_src = int(group.max()) + 1
    if groups is not None and weighting is not None:
        raise ValueError("a weighting scores sources, not mixture components: attribute a grouped bank with the "
                         "default ode tracking")
    dev = torch.device(device) if device is not None else (getattr(bank, "device", None) or x_T.device)
    log_prior = (lam / lam.sum()).log().to(dev)
    cond = {k: (v.to(dev) if torch.is_tensor(v) else v) for k, v in (cond or {}).items()}
    gen = torch.Generator().manual_seed(seed)
    abar = schedule.alphas_cumprod.double()  # read as scalars: stays on the CPU
    ts = _timesteps(schedule, steps)
    x = x_T.detach().float().to(dev).clone()
    b, d = x.shape[0], x[0].numel()
    P = 1 if exact else probes
    L = torch.zeros(P, b, n, dtype=torch.float64, device=dev)
    log_q = torch.zeros(b, n, dtype=torch.float64, device=dev)
    active = torch.ones(b, n, dtype=torch.bool, device=dev)
    idx = torch.arange(n, device=dev).repeat(b)
    rep = {k: (v.repeat_interleave(n, 0) if torch.is_tensor(v) and v.ndim and v.shape[0] == b else v)
           for k, v in cond.items()}
    weights, vparts = [], []
    if weighting is not None:
        weighting.reset()
    for k, t in enumerate(ts):
        a, a_next = abar[t], (abar[ts[k + 1]] if k + 1 < len(ts) else torch.tensor(1.0, dtype=torch.float64))
        sigma = float((1 - a).sqrt())
        delta = float(a_next.log() - a.log())  # int beta dt over the step (> 0)
        tb = torch.full((b * n,), t, dtype=torch.long, device=dev)
        xr = x.repeat_interleave(n, 0)
        store: dict = {}

        def f(inp, tb=tb, store=store):
            out = bank(inp, tb, idx, return_mid=True, **rep) if getattr(weighting, "needs_mid", False) \
                else bank(inp, tb, idx, **rep)
            if isinstance(out, tuple):
                out, store["mid"] = out
            store["eps"] = out
            return out

        div = divergence(f, xr, probes=P, exact=exact, generator=gen)  # (P, B*n) or (B*n,)
        div = div.view(P, b, n)
        eps = store["eps"].detach().double().view(b, n, -1)
        s = -eps / sigma
        xf = x.double().flatten(1).unsqueeze(1)
        if weighting is None:
            logits = log_prior + log_q
        else:
            extra = {}
            if "mid" in store:
                mid = store["mid"].detach()
                extra["mid"] = mid.view(b, n, *mid.shape[1:])
            logits = log_prior + weighting.log_likelihood(x, torch.full((b,), t, dtype=torch.long, device=dev),
                                                          store["eps"].detach().view(b, n, *x.shape[1:]), active,
                                                          log_prior, **extra).double()
        w = logits.softmax(1)
        s_bar = (w.unsqueeze(-1) * s).sum(1, keepdim=True)
        transfer = ((s - s_bar) * (xf + s)).sum(-1)  # <s_i - s_bar, x + s_i>  (B, n)
        if a < abar_floor:  # pure noise: exact integrand O(abar), the model's error times a huge beta dt
            delta = 0.0
        L += w * (-0.5 * delta) * (d - div / sigma + transfer)
        if weighting is None:  # d log p^i along the path, shared d dropped
            log_q = log_q - 0.5 * delta * (-div.mean(0) / sigma + (s * (s - s_bar)).sum(-1))
        weights.append(w.float())
        vparts.append(t)
        eps_c = (w.unsqueeze(-1) * eps).sum(1).view_as(x).float()
        x0 = (x - sigma * eps_c) / float(a.sqrt())
        if (a < abar_floor or clip) and x0_range is not None:  # at pure noise x0 = (x - eps)/sqrt(abar)
            x0 = x0.clamp(-x0_range, x0_range)  # magnifies the error ~1e4-fold
        x = (float(a_next.sqrt()) * x0 + float((1 - a_next).sqrt()) * eps_c).detach()
    if groups is not None:  # components -> sources
        group = group.to(dev)
        L = torch.zeros(P, b, n_src, dtype=L.dtype, device=dev).index_add_(2, group, L)
        weights = [torch.zeros(b, n_src, dtype=w.dtype, device=dev).index_add_(1, group, w) for w in weights]
    W = torch.stack(weights)  # (steps, B, sources)
    dt = torch.tensor([t - (ts[k + 1] if k + 1 < len(ts) else 0) for k, t in enumerate(ts)],
                      dtype=torch.float32).to(dev)
    path = (W * dt.view(-1, 1, 1)).sum(0) / dt.sum()
    total = L.sum(-1)  # (P, B)
    credit_p = L / total.unsqueeze(-1)
    L_mean = L.mean(0)
    credit = L_mean / L_mean.sum(-1, keepdim=True)

    def se(v: torch.Tensor) -> torch.Tensor:
        return v.std(0, unbiased=True) / P ** 0.5 if P > 1 else torch.full_like(v[0], float("nan"))

    def out(v: torch.Tensor) -> np.ndarray:
        return v.cpu().numpy()

    return {"x0": out(x), "credit": out(credit), "credit_se": out(se(credit_p)), "L": out(L_mean),
            "L_se": out(se(L)), "loglik_change": out(total.mean(0)), "weight_path": out(path),
            "weights": out(W), "timesteps": np.asarray(vparts), "probes": P, "exact": exact, "steps": steps}


def weight_path_credit(weights: np.ndarray | torch.Tensor,
                       times: np.ndarray | torch.Tensor | None = None) -> np.ndarray:
    """Time-integrated weights from a composed sampler's recorded trajectory (``ComposedDenoiser.trajectory()``,
    (calls, B, n)) and its ``times()`` (calls, B); without times, every call counts the same."""
    w = torch.as_tensor(np.asarray(weights), dtype=torch.float64)
    if times is None:
        return w.mean(0).numpy()
    t = torch.as_tensor(np.asarray(times), dtype=torch.float64)
    nxt = torch.cat([t[1:], torch.zeros_like(t[:1])])
    dt = (t - nxt).clamp(min=0).unsqueeze(-1)
    return ((w * dt).sum(0) / dt.sum(0).clamp(min=1e-12)).numpy()


def normalised_entropy(credit: np.ndarray) -> np.ndarray:
    """Entropy of each row of credits (clipped at 0, renormalised) divided by log n: 0 = one source, 1 = even."""
    c = np.clip(np.asarray(credit, dtype=np.float64), 0, None)
    c = c / np.clip(c.sum(-1, keepdims=True), 1e-300, None)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(c > 0, c * np.log(c), 0.0).sum(-1)
    return h / np.log(c.shape[-1])
