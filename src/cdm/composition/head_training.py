"""Training the learned composition weights: the joint router, isolated density-ratio heads, a noisy classifier.

:func:`train_router` (the ``router`` weighting), :func:`train_isolated_head` (one ``isolated`` head, via
:func:`fit_density_ratio`) and :func:`train_noisy_classifier` (the ``classifier`` weighting) train the modules
of :mod:`cdm.composition.heads`; :mod:`cdm.composition.learned` says what their logits mean.

Training batches are BALANCED over sources (and, for isolated heads, over source/core): every source is drawn
equally often whatever its size. A balanced classifier's logits are ``log p_t^k(x) + c(x)``, with no class
prior baked in, so the composed denoiser's ``log lambda`` (default: proportional to source size) is the only
prior, and a softmax over a subset of the logits is the posterior of the sub-mixture of those sources.

Rows are drawn as in compartment training: each step's batch, timesteps (uniform in ``0..T-1``), noise and
conditioning draw come from a generator seeded by ``(seed, step)``; sources are first put in canonical order,
so a head depends on the content of its data, not its order. ``cond_share`` of the rows run the forward with
the sample's class prompts (the rest with the source's unconditional prompts), so the heads also serve
class-conditional composition, where the right weights are ``lambda_i p_t^i(x, y)``.

Devices: heads, optimiser, the pooled data and every batch live on the backbone's device (the noisy classifier,
which has no backbone, on ``device``); the draws are made on the CPU from the per-step generators and moved, so a
head's training data are the same numbers on every device.
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

from ..backbone import Backbone, Codec
from ..compartments import Compartment
from ..data import Source
from ..errors import DataError, TrainingError
from ..io import config_from_dict
from ..provenance import git_commit, machine_info
from ..sampling import NoiseSchedule
from ..training.common import deterministic_algorithms, lr_at, progress_bar, step_generator
from .bank import CompartmentBank
from .heads import AttentionPoolHead, HeadBank, NoisyClassifier, one_logit

__all__ = ["HeadConfig", "fit_density_ratio", "router_logits", "train_isolated_head", "train_noisy_classifier",
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


# ----------------------------------------------------------------------------------------------- data


class _Pool:
    """Sources in model space (canonical order), and the draw of a balanced batch of noisy samples."""

    def __init__(self, codec: Codec, sources: Sequence[Source], num_classes: int | None,
                 inputs: Sequence[torch.Tensor | None] | None = None, texts: Sequence | None = None,
                 device: torch.device | str = "cpu"):
        from ..training.compartment import canonical_index, model_space

        self.device = torch.device(device)
        self.x, self.y, self.text, self.empty = [], [], [], None
        for i, s in enumerate(sources):
            if len(s) == 0:
                raise DataError(f"{s.id}: the source is empty")
            d, x = model_space(codec, s, None if inputs is None else inputs[i])
            self.x.append(x.to(self.device))
            if texts is not None:  # caption embeddings (CaptionEmbeddings, source order) of text compartments
                self.text.append(texts[i].rows[torch.from_numpy(canonical_index(s))].to(self.device))
                self.empty = texts[i].empty.to(self.device)
            # labels are used for class prompts only when the compartment has a row for every one of them
            usable = d.labels is not None and num_classes is not None and int(d.labels.max()) < num_classes
            self.y.append(torch.tensor(np.array(d.labels), dtype=torch.long).to(self.device) if usable else None)

    def __len__(self) -> int:
        return len(self.x)

    def draw(self, k: torch.Tensor, g: torch.Generator, schedule: NoiseSchedule, cond_share: float,
             null: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """``x_t`` (B, C, S, S), ``t`` (B,), ``y`` (B,) (the null class on unconditional rows; None when no row
        is conditional) and ``text`` (B, dim) (a pool with captions: each conditional row's caption embedding, the
        empty caption's on the others; else None) for rows drawn from sources ``k`` (B,), on the pool's device (the
        draws are made on the CPU from ``g``)."""
        b, dev = k.shape[0], self.device
        k = k.to(dev)
        u = torch.rand(b, generator=g).to(dev)
        x0 = torch.empty((b, *self.x[0].shape[1:]), device=dev)
        y = torch.full((b,), -1, dtype=torch.long, device=dev)
        text = None if not self.text else self.empty.expand(b, -1).clone()
        captioned = torch.zeros(b, dtype=torch.bool, device=dev)
        for j in range(len(self)):
            rows = (k == j).nonzero()[:, 0]
            if not rows.numel():
                continue
            idx = (u[rows] * len(self.x[j])).long().clamp(max=len(self.x[j]) - 1)
            x0[rows] = self.x[j][idx]
            if self.y[j] is not None:
                y[rows] = self.y[j][idx]
            if text is not None:
                text[rows] = self.text[j][idx]
                captioned[rows] = True
        share = (torch.rand(b, generator=g) < cond_share).to(dev)
        cond = share & (y >= 0)
        t = torch.randint(0, schedule.num_train_timesteps, (b,), generator=g).to(dev)
        noise = torch.randn(x0.shape, generator=g).to(dev)
        xt = schedule.add_noise(x0, noise, t)
        text = None if text is None else torch.where((share & captioned)[:, None], text, self.empty)
        if null is None or not cond.any():
            return xt, t, None, text
        return xt, t, torch.where(cond, y, torch.full_like(y, null)), text


def _balanced(n: int, b: int, g: torch.Generator) -> torch.Tensor:
    """Labels 0..n-1, each ``b // n`` or ``b // n + 1`` times (which get the extra ones: drawn)."""
    return (torch.arange(b) + torch.randint(0, n, (1,), generator=g)) % n


def _seeded(factory: Callable[[], nn.Module], tag: str, seed: int,
            device: torch.device | str = "cpu") -> nn.Module:
    """Build a module with parameters drawn from a seed of its own (the global RNG is left as it was), on the CPU,
    then move it to ``device``."""
    g = step_generator(tag + "/init", seed, 0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=g)))
        return factory().to(device)


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
                  y: torch.Tensor | None = None, text: torch.Tensor | None = None) -> torch.Tensor:
    """(B, n) logits: every sample through all n compartments (one batched forward, no grad), heads after.
    ``text``: caption embeddings (B, dim) for text compartments."""
    b, n = x.shape[0], len(bank)
    x_rep = x.repeat_interleave(n, dim=0)
    t_rep = t.repeat_interleave(n, dim=0)
    y_rep = None if y is None else y.repeat_interleave(n, dim=0)
    cond = {} if text is None else {"text": text.repeat_interleave(n, dim=0)}
    index = torch.arange(n, device=x.device).repeat(b)
    with torch.no_grad():
        _, mid = bank(x_rep, t_rep, index, y=y_rep, return_mid=True, **cond)
    return heads(mid.view(b, n, *mid.shape[1:]))


def _check_sources(compartments: Sequence, sources: Sequence[Source], what: str) -> None:
    if len(sources) < 2:
        raise DataError(f"a {what} needs at least two sources (got {len(sources)})")
    if compartments is not None and len(compartments) != len(sources):
        raise DataError(f"{len(compartments)} compartments for {len(sources)} sources")


def train_router(backbone: Backbone, compartments: Sequence[Compartment], sources: Sequence[Source], *,
                 cfg: HeadConfig | None = None, progress: bool = False,
                 inputs: Sequence[torch.Tensor | None] | None = None, texts: Sequence | None = None,
                 **overrides) -> tuple[HeadBank, dict]:
    """Train the joint router: n heads, CE on ``(x_t from source k, k)``, batches balanced over sources.

    ``compartments[i]`` is source i's (``inputs[i]``, optional: its rows already in the backbone's space, e.g.
    cached latents; ``texts[i]``: its caption embeddings, for text compartments, default: embedded here; the
    heads then learn ``p(source | x_t, caption)`` on ``cond_share`` of the rows, the empty caption on the rest).
    Backbone and compartments are frozen; only the heads learn. Keywords other than ``cfg``/``progress``/
    ``inputs``/``texts`` override :class:`HeadConfig` fields (``steps``, ``batch_size``, ``lr``, ``seed``...).
    Deterministic given (source contents, compartments, config). Returns ``(heads, record)``; the record's
    ``accuracy`` is measured on a held-out batch (fresh draws of sample, t and noise)."""
    cfg = _config(cfg, overrides)
    _check_sources(compartments, sources, "router")
    backbone.freeze()
    bank = CompartmentBank(backbone, compartments)
    first = compartments[0]
    n, T = len(sources), backbone.schedule.num_train_timesteps
    if first.config.text and texts is None:
        from ..text import caption_embeddings

        texts = [caption_embeddings(s.captions or (), first.config.text_encoder) for s in sources]
    dev = backbone.device
    pool = _Pool(backbone.codec, sources, first.num_classes if first.config.conditional else None, inputs,
                 texts if first.config.text else None, device=dev)
    null = backbone.config.null_class if first.config.conditional else None
    tag = _TAG + "/router"
    with deterministic_algorithms():
        heads = _seeded(lambda: HeadBank.create(n, backbone.config.embed_dim, cfg.num_heads), tag, cfg.seed, dev)

        def draw(g: torch.Generator, b: int):
            k = _balanced(n, b, g)
            return (*pool.draw(k, g, backbone.schedule, cfg.cond_share, null), k.to(dev))

        def loss_fn(g: torch.Generator) -> torch.Tensor:
            xt, t, y, text, k = draw(g, cfg.batch_size)
            return F.cross_entropy(router_logits(bank, heads, xt, t, y, text).float(), k)

        losses, wall = _optimise(heads, loss_fn, cfg, tag=tag, name="router", progress=progress)
        with torch.no_grad():
            xt, t, y, text, k = draw(step_generator(tag + "/eval", cfg.seed, 0), cfg.eval_size)
            part = lambda v, s: None if v is None else v[s:s + cfg.batch_size]  # noqa: E731
            logits = torch.cat([router_logits(bank, heads, part(xt, s), part(t, s), part(y, s), part(text, s))
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
    ``log p_pos(x) - log p_neg(x)`` (see :class:`~cdm.composition.IsolatedWeighting`).

    ``positive(g, m)`` / ``negative(g, m)`` draw ``(x, t, y)`` batches of m samples from generator g;
    ``features`` (computed without grad) maps them to the head's input. Returns a record with ``steps``,
    ``wall_seconds``, ``final_loss``, ``accuracy`` (held-out balanced batch) and, given ``num_timesteps``,
    ``accuracy_by_t``."""

    def batch(g: torch.Generator, m: int):
        xp, tp, yp = positive(g, m)
        xn, tn, yn = negative(g, m)
        with torch.no_grad():
            feats = torch.cat([features(xp, tp, yp), features(xn, tn, yn)])
        target = torch.cat([torch.ones(m), torch.zeros(m)]).to(feats.device)
        return feats, target, torch.cat([tp, tn])

    def loss_fn(g: torch.Generator) -> torch.Tensor:
        feats, target, _ = batch(g, cfg.batch_size // 2)
        return F.binary_cross_entropy_with_logits(one_logit(head, feats).float(), target)

    with deterministic_algorithms():
        losses, wall = _optimise(head, loss_fn, cfg, tag=tag, name=name, progress=progress)
        with torch.no_grad():
            feats, target, t = batch(step_generator(tag + "/eval", cfg.seed, 0), cfg.eval_size // 2)
            correct = (one_logit(head, feats) > 0).float() == target
    return {"steps": len(losses), "wall_seconds": round(wall, 2),
            "final_loss": float(np.mean(losses[-50:])) if losses else None,
            "accuracy": round(correct.float().mean().item(), 4),
            "accuracy_by_t": _t_buckets(t, correct, num_timesteps) if num_timesteps else {}}


def train_isolated_head(backbone: Backbone, compartment: Compartment, source: Source, core: Source, *,
                        cfg: HeadConfig | None = None, progress: bool = False, inputs: torch.Tensor | None = None,
                        **overrides) -> tuple[AttentionPoolHead, dict]:
    """One isolated density-ratio head for ``compartment`` (trained on ``source``): source (label 1) against the
    public ``core`` (label 0), both through this compartment's forward only. No other source is read.
    Keywords as :func:`train_router`. Returns ``(head, record)``."""
    cfg = _config(cfg, overrides)
    if compartment.config.text:
        raise TrainingError("isolated heads need public core data with captions like the source's: not supported "
                            "for text compartments (use the router or ito)")
    backbone.freeze()
    dev = backbone.device
    bank = CompartmentBank(backbone, [compartment])
    num_classes = compartment.num_classes if compartment.config.conditional else None
    null = backbone.config.null_class if compartment.config.conditional else None
    pos = _Pool(backbone.codec, [source], num_classes, [inputs], device=dev)
    neg = _Pool(backbone.codec, [core], num_classes, device=dev)
    tag = _TAG + "/isolated"

    def drawer(pool: _Pool):
        return lambda g, m: pool.draw(torch.zeros(m, dtype=torch.long), g, backbone.schedule, cfg.cond_share,
                                      null)[:3]  # no captions: isolated heads refuse text compartments

    def features(x, t, y):
        return bank(x, t, torch.zeros(x.shape[0], dtype=torch.long, device=x.device), y=y, return_mid=True)[1]

    head = _seeded(lambda: AttentionPoolHead(backbone.config.embed_dim, cfg.num_heads), tag, cfg.seed, dev)
    fit = fit_density_ratio(head, features, drawer(pos), drawer(neg), cfg, tag=tag,
                            name=f"isolated head {source.id}", num_timesteps=backbone.schedule.num_train_timesteps,
                            progress=progress)
    record = _record("isolated-head", cfg, [], 0.0, [source, core], backbone_hash=backbone.hash,
                     arch=head.arch(), core={"id": core.id, "content_hash": core.content_hash, "n": len(core)},
                     chance=0.5)
    record.update(fit)  # steps, wall time, final loss, accuracy
    return head.requires_grad_(False), record


# ----------------------------------------------------------------------------------------------- classifier


def train_noisy_classifier(schedule: NoiseSchedule, codec: Codec, sources: Sequence[Source], *,
                           cfg: HeadConfig | None = None, progress: bool = False,
                           inputs: Sequence[torch.Tensor | None] | None = None, device: torch.device | str = "cpu",
                           **overrides) -> tuple[NoisyClassifier, dict]:
    """Train a noisy classifier ``f(x_t, t)`` over the sources: CE on ``(x_t from source k, k)``, balanced
    batches, uniform t. Keywords as :func:`train_router`; ``device``: where it trains (it reads no backbone; pass
    the backbone's). Returns ``(model, record)``, the model on ``device``."""
    cfg = _config(cfg, overrides)
    _check_sources(None, sources, "noisy classifier")
    n, T = len(sources), schedule.num_train_timesteps
    dev = torch.device(device)
    pool = _Pool(codec, sources, None, inputs, device=dev)
    tag = _TAG + "/classifier"
    c, s = pool.x[0].shape[1], pool.x[0].shape[2]
    with deterministic_algorithms():
        model = _seeded(lambda: NoisyClassifier(n, img_size=s, in_chans=c, channels=cfg.channels), tag, cfg.seed,
                        dev)

        def draw(g: torch.Generator, b: int):
            k = _balanced(n, b, g)
            xt, t, _, _ = pool.draw(k, g, schedule, 0.0, None)
            return xt, t, k.to(dev)

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
