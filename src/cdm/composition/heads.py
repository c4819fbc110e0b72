"""Learned composition weights: heads that estimate which source a noisy ``x_t`` came from.

Three learned weightings plug into :class:`~cdm.composition.ComposedDenoiser` (registered in ``WEIGHTINGS``):

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

Training batches are BALANCED over sources (and, for isolated heads, over source/core): every source is drawn
equally often whatever its size. A balanced classifier's logits are ``log p_t^k(x) + c(x)``, with no class
prior baked in, so the composed denoiser's ``log lambda`` (default: proportional to source size) is the only
prior, and a softmax over a subset of the logits is the posterior of the sub-mixture of those sources.

Rows are drawn as in compartment training: each step's batch, timesteps (uniform in ``0..T-1``), noise and
conditioning draw come from a generator seeded by ``(seed, step)``; sources are first put in canonical order,
so a head depends on the content of its data, not its order. ``cond_share`` of the rows run the forward with
the sample's class prompts (the rest with the source's unconditional prompts), so the heads also serve
class-conditional composition, where the right weights are ``lambda_i p_t^i(x, y)``.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..backbone import Backbone, PixelCodec, timestep_embedding
from ..compartments import Compartment
from ..data import Source
from ..errors import DataError, TrainingError
from ..io import config_from_dict, load_strict
from ..sampling import NoiseSchedule
from ..training.common import deterministic_algorithms, lr_at, progress_bar, step_generator
from .bank import CompartmentBank

__all__ = ["AttentionPoolHead", "ClassifierWeighting", "HeadBank", "HeadConfig", "IsolatedWeighting",
           "NoisyClassifier", "RouterWeighting", "fit_density_ratio", "load_head", "load_head_bank",
           "load_noisy_classifier", "router_logits", "state_tensors", "train_isolated_head", "train_noisy_classifier",
           "train_router"]

_TAG = "cdm-heads"


# ----------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class HeadConfig:
    steps: int = 500  # optimiser steps
    batch_size: int = 64  # noisy samples per step (split evenly over the classes)
    lr: float = 3e-3  # Adam
    lr_schedule: str = "cosine"  # "constant" or "cosine" (to 10% of lr) after warm-up
    warmup: int = 20
    grad_clip: float = 1.0
    num_heads: int = 1  # attention heads of each pooling head (must divide the token width)
    channels: int = 32  # width of the noisy classifier (kind "classifier" only)
    cond_share: float = 0.5  # share of rows whose forward uses the sample's class prompts (labelled sources)
    eval_size: int = 256  # noisy samples in the held-out batch the record's accuracy is measured on
    seed: int = 0

    def __post_init__(self) -> None:
        problems = []
        if self.steps < 1 or self.batch_size < 2 or self.eval_size < 2:
            problems.append(f"steps must be >= 1 and batch_size, eval_size >= 2 (got {self.steps}, "
                            f"{self.batch_size}, {self.eval_size})")
        if not (math.isfinite(self.lr) and self.lr > 0):
            problems.append(f"lr must be a positive number (got {self.lr})")
        if self.lr_schedule not in ("constant", "cosine"):
            problems.append(f"lr_schedule must be 'constant' or 'cosine' (got {self.lr_schedule!r})")
        if self.num_heads < 1 or self.channels < 1 or self.warmup < 0:
            problems.append("num_heads and channels must be >= 1, warmup >= 0")
        if not 0.0 <= self.cond_share <= 1.0:
            problems.append(f"cond_share must be in [0, 1] (got {self.cond_share})")
        if problems:
            raise ValueError("; ".join(problems))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> HeadConfig:
        return config_from_dict(cls, d, "head")


def _config(cfg: HeadConfig | None, overrides: dict) -> HeadConfig:
    base = cfg or HeadConfig()
    return HeadConfig.from_dict({**base.to_dict(), **overrides}) if overrides else base


# ----------------------------------------------------------------------------------------------- modules


class AttentionPoolHead(nn.Module):
    """Tokens (B, L, D) -> one logit per sample (B,): LayerNorm, a learned query attends over the tokens
    (``num_heads`` heads), a projection, then a linear read-out. The time token is among the tokens, so no
    separate time input is needed. The read-out starts at zero: an untrained head gives uniform weights."""

    def __init__(self, dim: int, num_heads: int = 1):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"token width {dim} is not a multiple of num_heads {num_heads}")
        self.dim, self.num_heads = dim, num_heads
        self.norm = nn.LayerNorm(dim)
        self.query = nn.Parameter(torch.zeros(1, num_heads, 1, dim // num_heads))
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, 1)
        nn.init.trunc_normal_(self.query, std=0.02)
        nn.init.trunc_normal_(self.kv.weight, std=0.02)
        nn.init.zeros_(self.kv.bias)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def arch(self) -> dict:
        return {"dim": self.dim, "num_heads": self.num_heads}

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        b, n, d = tokens.shape
        h = self.num_heads
        kv = self.kv(self.norm(tokens)).view(b, n, 2, h, d // h).permute(2, 0, 3, 1, 4)  # (2, B, H, L, Dh)
        pooled = F.scaled_dot_product_attention(self.query.expand(b, -1, -1, -1), kv[0], kv[1])  # (B, H, 1, Dh)
        return self.out(self.proj(pooled.reshape(b, d))).squeeze(-1)


def _one_logit(module: nn.Module, features: torch.Tensor) -> torch.Tensor:
    out = module(features)
    if out.numel() != features.shape[0]:
        raise ValueError(f"a head must return one logit per sample, got shape {tuple(out.shape)}")
    return out.reshape(features.shape[0])


class HeadBank(nn.Module):
    """n heads; head i reads the tokens of compartment i's forward: ``forward(mid (B, n, L, D)) -> (B, n)``.

    Any modules mapping (B, L, D) to one logit per sample work (tests use plain linear maps);
    :meth:`create` builds :class:`AttentionPoolHead` s, the kind cdm trains and stores."""

    def __init__(self, heads: Sequence[nn.Module]):
        super().__init__()
        if not heads:
            raise ValueError("a head bank needs at least one head")
        self.heads = nn.ModuleList(heads)

    @classmethod
    def create(cls, n: int, dim: int, num_heads: int = 1) -> HeadBank:
        return cls([AttentionPoolHead(dim, num_heads) for _ in range(n)])

    def __len__(self) -> int:
        return len(self.heads)

    def select(self, columns: Sequence[int]) -> HeadBank:
        """The heads for ``columns``, in that order (modules shared, not copied)."""
        return HeadBank([self.heads[int(i)] for i in columns])

    def forward(self, mid: torch.Tensor, active: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, n); with ``active`` (B, n) bool only those pairs are evaluated (the others are 0)."""
        b, n = mid.shape[:2]
        if n != len(self.heads):
            raise ValueError(f"{len(self.heads)} heads for tokens of {n} compartments")
        cols = []
        for i, head in enumerate(self.heads):
            if active is None:
                cols.append(_one_logit(head, mid[:, i]))
                continue
            col = torch.zeros(b, dtype=mid.dtype, device=mid.device)
            rows = active[:, i].nonzero()[:, 0]
            if rows.numel():
                col = col.index_put((rows,), _one_logit(head, mid[rows, i]).to(col.dtype))
            cols.append(col)
        return torch.stack(cols, dim=1)


class NoisyClassifier(nn.Module):
    """``f(x_t, t) -> (B, n)`` logits over the sources: a small CNN on the model-space image (B, C, S, S) with a
    sinusoidal time embedding (as the U-ViT's) that shifts the features of its second stage."""

    def __init__(self, n_sources: int, *, img_size: int = 14, in_chans: int = 1, channels: int = 32,
                 time_dim: int = 64):
        super().__init__()
        if n_sources < 1:
            raise ValueError("a noisy classifier needs at least one source")
        self.config = {"n_sources": n_sources, "img_size": img_size, "in_chans": in_chans, "channels": channels,
                       "time_dim": time_dim}
        c = channels
        groups = lambda k: math.gcd(8, k)  # noqa: E731
        self.time_dim = time_dim
        self.time = nn.Sequential(nn.Linear(time_dim, 2 * c), nn.SiLU(), nn.Linear(2 * c, 2 * c))
        self.conv1 = nn.Conv2d(in_chans, c, 3, padding=1)
        self.norm1 = nn.GroupNorm(groups(c), c)
        self.conv2 = nn.Conv2d(c, 2 * c, 3, stride=2, padding=1)
        self.norm2 = nn.GroupNorm(groups(2 * c), 2 * c)
        self.conv3 = nn.Conv2d(2 * c, 2 * c, 3, stride=2, padding=1)
        self.norm3 = nn.GroupNorm(groups(2 * c), 2 * c)
        self.out = nn.Linear(2 * c, n_sources)

    def arch(self) -> dict:
        return dict(self.config)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        temb = self.time(timestep_embedding(t, self.time_dim).to(x.dtype))
        h = F.silu(self.norm1(self.conv1(x)))
        h = F.silu(self.norm2(self.conv2(h)) + temb[:, :, None, None])
        h = F.silu(self.norm3(self.conv3(h)))
        return self.out(h.mean(dim=(2, 3)))


# ----------------------------------------------------------------------------------------------- weightings


class RouterWeighting:
    """The paper's router: logits ``heads(mid)``, head i on the mid tokens of compartment i's forward.

    Trained jointly with cross-entropy on balanced batches (:func:`train_router`), its logits are
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
        dtype = next(self.heads.parameters()).dtype
        return self.heads(mid.to(dtype), active).double()


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
        dtype = next(self.model.parameters()).dtype
        logits = self.model(x.to(dtype), t).double()
        return logits if self.columns is None else logits[:, self.columns.to(logits.device)]


# ----------------------------------------------------------------------------------------------- data


class _Pool:
    """Sources in model space (canonical order), and the draw of a balanced batch of noisy samples."""

    def __init__(self, codec: PixelCodec, sources: Sequence[Source], num_classes: int | None):
        from ..training.compartment import canonical_order

        self.x, self.y = [], []
        for s in sources:
            if len(s) == 0:
                raise DataError(f"{s.id}: the source is empty")
            d = canonical_order(s)
            self.x.append(codec.encode(d.images))
            # labels are used for class prompts only when the compartment has a row for every one of them
            usable = d.labels is not None and num_classes is not None and int(d.labels.max()) < num_classes
            self.y.append(torch.tensor(np.array(d.labels), dtype=torch.long) if usable else None)

    def __len__(self) -> int:
        return len(self.x)

    def draw(self, k: torch.Tensor, g: torch.Generator, schedule: NoiseSchedule, cond_share: float,
             null: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``x_t`` (B, C, S, S), ``t`` (B,) and ``y`` (B,) (the null class on unconditional rows; None when no
        row is conditional) for rows drawn from sources ``k`` (B,)."""
        b = k.shape[0]
        u = torch.rand(b, generator=g)
        x0 = torch.empty((b, *self.x[0].shape[1:]))
        y = torch.full((b,), -1, dtype=torch.long)
        for j in range(len(self)):
            rows = (k == j).nonzero()[:, 0]
            if not rows.numel():
                continue
            idx = (u[rows] * len(self.x[j])).long().clamp(max=len(self.x[j]) - 1)
            x0[rows] = self.x[j][idx]
            if self.y[j] is not None:
                y[rows] = self.y[j][idx]
        cond = (torch.rand(b, generator=g) < cond_share) & (y >= 0)
        t = torch.randint(0, schedule.num_train_timesteps, (b,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        xt = schedule.add_noise(x0, noise, t)
        if null is None or not cond.any():
            return xt, t, None
        return xt, t, torch.where(cond, y, torch.full_like(y, null))


def _balanced(n: int, b: int, g: torch.Generator) -> torch.Tensor:
    """Labels 0..n-1, each ``b // n`` or ``b // n + 1`` times (which get the extra ones: drawn)."""
    return (torch.arange(b) + torch.randint(0, n, (1,), generator=g)) % n


def _seeded(factory: Callable[[], nn.Module], tag: str, seed: int) -> nn.Module:
    """Build a module with parameters drawn from a seed of its own (the global RNG is left as it was)."""
    g = step_generator(tag + "/init", seed, 0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=g)))
        return factory()


def _optimise(module: nn.Module, loss_fn: Callable[[torch.Generator], torch.Tensor], cfg: HeadConfig, *, tag: str,
              name: str, progress: bool) -> tuple[list[float], float]:
    """Adam on the module's parameters; step ``s`` draws from ``step_generator(tag, seed, s)``."""
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.lr)
    losses: list[float] = []
    t0 = time.perf_counter()
    module.train()
    with progress_bar(name, cfg.steps, 0, progress) as show:
        for step in range(cfg.steps):
            g = step_generator(tag, cfg.seed, step)
            for group in opt.param_groups:
                group["lr"] = lr_at(step, lr=cfg.lr, warmup=cfg.warmup, steps=cfg.steps, schedule=cfg.lr_schedule)
            loss = loss_fn(g)
            if not torch.isfinite(loss):
                raise TrainingError(f"loss is {loss.item()} at step {step} of {name}; stopped")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            losses.append(round(loss.item(), 5))
            show(step + 1, float(np.mean(losses[-50:])))
    module.eval()
    return losses, time.perf_counter() - t0


def _t_buckets(t: torch.Tensor, correct: torch.Tensor, T: int) -> dict[str, float]:
    out = {}
    for lo in range(0, T, T // 4):
        hi = min(lo + T // 4, T)
        sel = (t >= lo) & (t < hi)
        if sel.any():
            out[f"{lo}-{hi - 1}"] = round(correct[sel].float().mean().item(), 4)
    return out


def _record(kind: str, cfg: HeadConfig, losses: list[float], wall: float, sources: Sequence[Source],
            **extra) -> dict:
    from ..training.pretrain import git_commit, machine_info

    return {
        "kind": kind,
        "config": cfg.to_dict(),
        "seed": cfg.seed,
        "steps": len(losses),
        "wall_seconds": round(wall, 2),
        "final_loss": float(np.mean(losses[-50:])) if losses else None,
        "sources_seen": [{"id": s.id, "content_hash": s.content_hash, "n": len(s)} for s in sources],
        "balance": "balanced",
        **extra,
        "commit": git_commit(),
        "machine": machine_info(),
    }


# ----------------------------------------------------------------------------------------------- router


def router_logits(bank: CompartmentBank, heads: HeadBank, x: torch.Tensor, t: torch.Tensor,
                  y: torch.Tensor | None = None) -> torch.Tensor:
    """(B, n) logits: every sample through all n compartments (one batched forward, no grad), heads after."""
    b, n = x.shape[0], len(bank)
    x_rep = x.repeat_interleave(n, dim=0)
    t_rep = t.repeat_interleave(n, dim=0)
    y_rep = None if y is None else y.repeat_interleave(n, dim=0)
    index = torch.arange(n).repeat(b)
    with torch.no_grad():
        _, mid = bank(x_rep, t_rep, index, y=y_rep, return_mid=True)
    return heads(mid.view(b, n, *mid.shape[1:]))


def _check_sources(compartments: Sequence, sources: Sequence[Source], what: str) -> None:
    if len(sources) < 2:
        raise DataError(f"a {what} needs at least two sources (got {len(sources)})")
    if compartments is not None and len(compartments) != len(sources):
        raise DataError(f"{len(compartments)} compartments for {len(sources)} sources")


def train_router(backbone: Backbone, compartments: Sequence[Compartment], sources: Sequence[Source], *,
                 cfg: HeadConfig | None = None, progress: bool = False, **overrides) -> tuple[HeadBank, dict]:
    """Train the joint router: n heads, CE on ``(x_t from source k, k)``, batches balanced over sources.

    ``compartments[i]`` is source i's. Backbone and compartments are frozen; only the heads learn. Keywords
    other than ``cfg``/``progress`` override :class:`HeadConfig` fields (``steps``, ``batch_size``, ``lr``,
    ``seed``...). Deterministic given (source contents, compartments, config). Returns ``(heads, record)``;
    the record's ``accuracy`` is measured on a held-out batch (fresh draws of sample, t and noise)."""
    cfg = _config(cfg, overrides)
    _check_sources(compartments, sources, "router")
    backbone.freeze()
    bank = CompartmentBank(backbone, compartments)
    first = compartments[0]
    n, T = len(sources), backbone.schedule.num_train_timesteps
    pool = _Pool(backbone.codec, sources, first.num_classes if first.config.conditional else None)
    null = backbone.config.null_class if first.config.conditional else None
    tag = _TAG + "/router"
    with deterministic_algorithms():
        heads = _seeded(lambda: HeadBank.create(n, backbone.config.embed_dim, cfg.num_heads), tag, cfg.seed)

        def draw(g: torch.Generator, b: int):
            k = _balanced(n, b, g)
            return (*pool.draw(k, g, backbone.schedule, cfg.cond_share, null), k)

        def loss_fn(g: torch.Generator) -> torch.Tensor:
            xt, t, y, k = draw(g, cfg.batch_size)
            return F.cross_entropy(router_logits(bank, heads, xt, t, y).float(), k)

        losses, wall = _optimise(heads, loss_fn, cfg, tag=tag, name="router", progress=progress)
        with torch.no_grad():
            xt, t, y, k = draw(step_generator(tag + "/eval", cfg.seed, 0), cfg.eval_size)
            logits = torch.cat([router_logits(bank, heads, xt[s:s + cfg.batch_size], t[s:s + cfg.batch_size],
                                              None if y is None else y[s:s + cfg.batch_size])
                                for s in range(0, len(k), cfg.batch_size)])
    correct = logits.argmax(1) == k
    record = _record("router", cfg, losses, wall, sources, backbone_hash=backbone.hash,
                     arch={"n": n, "dim": backbone.config.embed_dim, "num_heads": cfg.num_heads},
                     accuracy=round(correct.float().mean().item(), 4), accuracy_by_t=_t_buckets(t, correct, T),
                     chance=round(1 / n, 4))
    return heads.requires_grad_(False), record


# ----------------------------------------------------------------------------------------------- isolated


Draw = Callable[[torch.Generator, int], tuple]  # (generator, m) -> (x, t, y) for m samples


def fit_density_ratio(head: nn.Module, features: Callable[..., torch.Tensor], positive: Draw, negative: Draw,
                      cfg: HeadConfig, *, tag: str = _TAG + "/isolated", name: str = "isolated head",
                      num_timesteps: int | None = None, progress: bool = False) -> dict:
    """Balanced binary logistic regression of ``head(features(x, t, y))``: positives (label 1) against
    negatives (label 0), ``batch_size // 2`` of each per step, so the optimal logit is
    ``log p_pos(x) - log p_neg(x)`` (see :class:`IsolatedWeighting`).

    ``positive(g, m)`` / ``negative(g, m)`` draw ``(x, t, y)`` batches of m samples from generator g;
    ``features`` (computed without grad) maps them to the head's input. Returns a record with ``steps``,
    ``wall_seconds``, ``final_loss``, ``accuracy`` (held-out balanced batch) and, given ``num_timesteps``,
    ``accuracy_by_t``."""

    def batch(g: torch.Generator, m: int):
        xp, tp, yp = positive(g, m)
        xn, tn, yn = negative(g, m)
        with torch.no_grad():
            feats = torch.cat([features(xp, tp, yp), features(xn, tn, yn)])
        target = torch.cat([torch.ones(m), torch.zeros(m)])
        return feats, target, torch.cat([tp, tn])

    def loss_fn(g: torch.Generator) -> torch.Tensor:
        feats, target, _ = batch(g, cfg.batch_size // 2)
        return F.binary_cross_entropy_with_logits(_one_logit(head, feats).float(), target)

    with deterministic_algorithms():
        losses, wall = _optimise(head, loss_fn, cfg, tag=tag, name=name, progress=progress)
        with torch.no_grad():
            feats, target, t = batch(step_generator(tag + "/eval", cfg.seed, 0), cfg.eval_size // 2)
            correct = (_one_logit(head, feats) > 0).float() == target
    return {"steps": len(losses), "wall_seconds": round(wall, 2),
            "final_loss": float(np.mean(losses[-50:])) if losses else None,
            "accuracy": round(correct.float().mean().item(), 4),
            "accuracy_by_t": _t_buckets(t, correct, num_timesteps) if num_timesteps else {}}


def train_isolated_head(backbone: Backbone, compartment: Compartment, source: Source, core: Source, *,
                        cfg: HeadConfig | None = None, progress: bool = False,
                        **overrides) -> tuple[AttentionPoolHead, dict]:
    """One isolated density-ratio head for ``compartment`` (trained on ``source``): source (label 1) against the
    public ``core`` (label 0), both through this compartment's forward only. No other source is read.
    Keywords as :func:`train_router`. Returns ``(head, record)``."""
    cfg = _config(cfg, overrides)
    backbone.freeze()
    bank = CompartmentBank(backbone, [compartment])
    num_classes = compartment.num_classes if compartment.config.conditional else None
    null = backbone.config.null_class if compartment.config.conditional else None
    pos, neg = _Pool(backbone.codec, [source], num_classes), _Pool(backbone.codec, [core], num_classes)
    tag = _TAG + "/isolated"

    def drawer(pool: _Pool):
        return lambda g, m: pool.draw(torch.zeros(m, dtype=torch.long), g, backbone.schedule, cfg.cond_share, null)

    def features(x, t, y):
        return bank(x, t, torch.zeros(x.shape[0], dtype=torch.long), y=y, return_mid=True)[1]

    head = _seeded(lambda: AttentionPoolHead(backbone.config.embed_dim, cfg.num_heads), tag, cfg.seed)
    fit = fit_density_ratio(head, features, drawer(pos), drawer(neg), cfg, tag=tag,
                            name=f"isolated head {source.id}", num_timesteps=backbone.schedule.num_train_timesteps,
                            progress=progress)
    record = _record("isolated-head", cfg, [], 0.0, [source, core], backbone_hash=backbone.hash,
                     arch=head.arch(), core={"id": core.id, "content_hash": core.content_hash, "n": len(core)},
                     chance=0.5)
    record.update(fit)  # steps, wall time, final loss, accuracy
    return head.requires_grad_(False), record


# ----------------------------------------------------------------------------------------------- classifier


def train_noisy_classifier(schedule: NoiseSchedule, codec: PixelCodec, sources: Sequence[Source], *,
                           cfg: HeadConfig | None = None, progress: bool = False,
                           **overrides) -> tuple[NoisyClassifier, dict]:
    """Train a noisy classifier ``f(x_t, t)`` over the sources: CE on ``(x_t from source k, k)``, balanced
    batches, uniform t. Keywords as :func:`train_router`. Returns ``(model, record)``."""
    cfg = _config(cfg, overrides)
    _check_sources(None, sources, "noisy classifier")
    n, T = len(sources), schedule.num_train_timesteps
    pool = _Pool(codec, sources, None)
    tag = _TAG + "/classifier"
    c, s = pool.x[0].shape[1], pool.x[0].shape[2]
    with deterministic_algorithms():
        model = _seeded(lambda: NoisyClassifier(n, img_size=s, in_chans=c, channels=cfg.channels), tag, cfg.seed)

        def draw(g: torch.Generator, b: int):
            k = _balanced(n, b, g)
            xt, t, _ = pool.draw(k, g, schedule, 0.0, None)
            return xt, t, k

        def loss_fn(g: torch.Generator) -> torch.Tensor:
            xt, t, k = draw(g, cfg.batch_size)
            return F.cross_entropy(model(xt, t), k)

        losses, wall = _optimise(model, loss_fn, cfg, tag=tag, name="noisy classifier", progress=progress)
        with torch.no_grad():
            xt, t, k = draw(step_generator(tag + "/eval", cfg.seed, 0), cfg.eval_size)
            correct = model(xt, t).argmax(1) == k
    record = _record("classifier", cfg, losses, wall, sources, arch=model.arch(), schedule=schedule.to_dict(),
                     codec=codec.to_dict(), accuracy=round(correct.float().mean().item(), 4),
                     accuracy_by_t=_t_buckets(t, correct, T), chance=round(1 / n, 4))
    return model.requires_grad_(False), record


# ----------------------------------------------------------------------------------------------- loading


def _tensors_to(module: nn.Module, tensors: dict[str, torch.Tensor], origin: str) -> nn.Module:
    load_strict(module, tensors, origin)
    return module.eval().requires_grad_(False)


def load_head_bank(tensors: dict[str, torch.Tensor], arch: dict, origin: str = "router") -> HeadBank:
    """A :class:`HeadBank` of attention-pooling heads from its state dict and ``arch`` (n, dim, num_heads)."""
    bank = HeadBank.create(int(arch["n"]), int(arch["dim"]), int(arch.get("num_heads", 1)))
    return _tensors_to(bank, tensors, origin)


def load_head(tensors: dict[str, torch.Tensor], arch: dict, origin: str = "isolated head") -> AttentionPoolHead:
    return _tensors_to(AttentionPoolHead(int(arch["dim"]), int(arch.get("num_heads", 1))), tensors, origin)


def load_noisy_classifier(tensors: dict[str, torch.Tensor], arch: dict,
                          origin: str = "noisy classifier") -> NoisyClassifier:
    arch = dict(arch)
    n = int(arch.pop("n_sources"))
    return _tensors_to(NoisyClassifier(n, **{k: int(v) for k, v in arch.items()}), tensors, origin)


def state_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """A module's state dict as contiguous, detached copies (what the store writes as safetensors)."""
    return {k: v.detach().clone().contiguous() for k, v in module.state_dict().items()}
