"""Pretraining of the backbone on PUBLIC data only (``cdm pretrain``), class-conditional or unconditional.

The public training set is, by default, the fixed public slice of the embedded MNIST (100 per class, chosen by
content hash, see :mod:`cdm.data`) plus, optionally, synthetic font glyphs of the digits; or any source spec of
public images (``data``: a folder, an ``.npz``), of any size and grey or RGB, fitted to a square
``data_size`` (the stored images the backbone will take) and pooled to the model's ``img_size``. Nothing from
the protected 4,000 digits can reach this loop: :func:`public_training_set` is the only data it reads, and its
sample hashes are written into the training record (tests check them against the protected hashes).

Deterministic: every step draws its batch, timesteps, noise and label dropout from a generator seeded by
``(seed, step)``, so a run resumed from a checkpoint is bit-identical to an uninterrupted one (same machine,
same thread count).
"""

from __future__ import annotations

import copy
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch

from ..backbone import Backbone, Codec, LatentCodec, PixelCodec, UViT, UViTConfig
from ..data.glyphs import glyphs
from ..data.mnist import public_protected
from ..data.source import Source, concat_sources
from ..data.spec import ImageSpec
from ..errors import TrainingError
from ..provenance import git_commit, machine_info
from ..sampling import NoiseSchedule
from .checkpoint import load_checkpoint, save_checkpoint
from .common import deterministic_algorithms, lr_at, progress_bar, step_generator
from .loss import draw_noise, eps_loss

__all__ = ["PretrainConfig", "make_codec", "pretrain", "public_training_set"]


@dataclass(frozen=True)
class PretrainConfig:
    # model (see UViTConfig)
    img_size: int = 14  # model-space side; stored 28x28 images are 2x2 average-pooled
    patch_size: int = 2
    embed_dim: int = 128
    depth: int = 7
    num_heads: int = 4
    schedule: str = "cosine"  # noise schedule name (cdm.sampling.SCHEDULES)
    # data
    data: str = ""  # a source spec of public images (folder, .npz ...); "" = the public digits and/or glyphs below
    data_size: int = 28  # side of the stored (square) images the backbone takes; a multiple of img_size
    channels: int = 1  # 1 grey, 3 RGB (data of the other kind is converted)
    autoencoder: str = ""  # latent mode: an autoencoder folder or shipped:NAME (img_size = data_size / its factor,
    #                        in_chans = its latent channels); "" = pixel mode
    unconditional: bool = False  # no class token (and no guidance); labels, if any, are ignored
    glyphs: int = 0  # synthetic digit glyphs added to the 1,000 public MNIST digits (0 = none)
    public_digits: bool = True  # False: glyphs only, a backbone that never saw a handwritten digit (the paper's
    #                             setting: a domain gap between the public pretraining data and the protected data)
    # optimisation
    steps: int = 3600  # total optimiser steps
    batch_size: int = 64
    lr: float = 2e-3  # AdamW peak learning rate
    lr_schedule: str = "constant"  # "constant" or "cosine" (to 10% of lr) after warm-up
    warmup: int = 200  # linear warm-up steps
    weight_decay: float = 0.03  # on weight matrices only
    grad_clip: float = 1.0  # max global grad norm
    ema_decay: float = 0.999  # EMA of weights (the EMA is what ships)
    label_dropout: float = 0.1  # share of labels replaced by the null class (for classifier-free guidance)
    seed: int = 0
    checkpoint_every: int = 200  # steps between checkpoints

    def model_config(self, n_classes: int = 10, in_chans: int | None = None) -> UViTConfig:
        """The U-ViT for data of ``n_classes`` classes: one label row each plus the null class (for guidance),
        or none when unconditional; ``in_chans`` (default: the image channels) is the latent's in latent mode."""
        labels = dict(num_classes=-1, null_class=None) if self.unconditional or n_classes < 1 else \
            dict(num_classes=n_classes + 1, null_class=n_classes)
        return UViTConfig(img_size=self.img_size, patch_size=self.patch_size, in_chans=in_chans or self.channels,
                          embed_dim=self.embed_dim, depth=self.depth, num_heads=self.num_heads, **labels)

    @property
    def image_spec(self) -> ImageSpec:
        return ImageSpec(self.data_size, self.data_size, self.channels)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> PretrainConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def public_training_set(cfg: PretrainConfig) -> Source:
    """The only data pretraining reads: ``cfg.data`` fitted to ``cfg.image_spec``, or the public MNIST slice
    and/or ``cfg.glyphs`` digit glyphs."""
    if cfg.data:
        from ..data import fit, load_source

        return fit(load_source(cfg.data), cfg.image_spec)
    if not cfg.public_digits and not cfg.glyphs:
        raise ValueError("pretraining needs data: public digits, glyphs, or both")
    public, _ = public_protected()
    if not cfg.glyphs:
        return public
    g = glyphs(cfg.glyphs, seed=cfg.seed, charset="digits")
    return concat_sources([public, g], id=f"{public.id}+{g.id}") if cfg.public_digits else g


def make_codec(cfg: PretrainConfig) -> Codec:
    """Pixels pooled to ``img_size``, or (``cfg.autoencoder``) that autoencoder's latents, which must come out
    ``img_size`` on a side."""
    if not cfg.autoencoder:
        return PixelCodec(data_size=cfg.data_size, model_size=cfg.img_size, channels=cfg.channels)
    from ..autoencoder import Autoencoder

    codec = LatentCodec(Autoencoder.from_pretrained(cfg.autoencoder), data_size=cfg.data_size, channels=cfg.channels)
    if codec.model_size != cfg.img_size:
        raise TrainingError(f"autoencoder {cfg.autoencoder} makes {codec.model_size}x{codec.model_size} latents of "
                            f"{cfg.data_size}x{cfg.data_size} images: set the image size to {codec.model_size}")
    return codec


def _pretrain(cfg: PretrainConfig, out: str | Path, *, max_minutes: float | None = None, progress: bool = True,
             command: str | None = None, on_batch: Callable[[np.ndarray], None] | None = None) -> dict:
    """Train (or resume) a backbone in ``out``; when ``cfg.steps`` are done, write the shipped bundle there.

    ``out/checkpoint.safetensors`` holds the resumable state; ``max_minutes`` stops early after a checkpoint
    (train in chunks). Returns the training record (``finished`` says whether all steps are done).
    """
    lr_at(0, lr=cfg.lr, warmup=cfg.warmup, steps=cfg.steps, schedule=cfg.lr_schedule)  # validates the schedule
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = public_training_set(cfg)
    if data.spec != cfg.image_spec:
        raise TrainingError(f"{data.id}: images are {data.spec}, the config says {cfg.image_spec} (set data_size "
                            "and channels, or give data that fits)")
    codec = make_codec(cfg)
    schedule = NoiseSchedule(cfg.schedule)
    x_all = codec.encode(data.images)
    if codec.kind == "latent":  # the box its samples are clipped to: 1.5x the largest latent seen
        codec.x0_range = round(1.5 * float(x_all.abs().max()), 2)
    model_cfg = cfg.model_config(len(data.classes), in_chans=codec.model_channels)
    conditional = model_cfg.num_classes > 0
    y_all = torch.tensor(data.labels, dtype=torch.long) if conditional else None

    torch.manual_seed(cfg.seed)
    net = UViT(model_cfg)
    ema = copy.deepcopy(net).requires_grad_(False)
    decay, no_decay = [], []
    for n, p in net.named_parameters():
        (decay if p.ndim >= 2 and n != "pos_embed" else no_decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.99))
    ckpt = out / "checkpoint.safetensors"
    step, wall, losses = 0, 0.0, []
    if ckpt.exists():
        header = load_checkpoint(ckpt, net, ema, opt)
        saved = PretrainConfig.from_dict(header.get("config", {}))
        if {**saved.to_dict(), "steps": 0} != {**cfg.to_dict(), "steps": 0}:
            raise TrainingError(f"{ckpt}: was trained with another config; use a new --out or the same config")
        step, wall, losses = header["step"], header["wall_seconds"], header.get("recent_losses", [])

    def header() -> dict:
        return {"config": cfg.to_dict(), "step": step, "wall_seconds": round(wall, 2), "recent_losses": losses[-100:]}

    t_start = time.perf_counter()
    last_save = step
    net.train()
    with progress_bar("pretrain", cfg.steps, step, progress) as show:
        while step < cfg.steps:
            g = step_generator("cdm-pretrain", cfg.seed, step)
            idx = torch.randint(0, len(data), (cfg.batch_size,), generator=g)
            if on_batch is not None:
                on_batch(data.images[idx.numpy()])
            x0 = x_all[idx]
            drop = torch.rand(cfg.batch_size, generator=g) < cfg.label_dropout  # drawn either way: same stream
            y = None
            if conditional:
                y = y_all[idx].clone()
                y[drop] = model_cfg.null_class
            t, noise = draw_noise(x0, schedule, g)
            for group in opt.param_groups:
                group["lr"] = lr_at(step, lr=cfg.lr, warmup=cfg.warmup, steps=cfg.steps, schedule=cfg.lr_schedule)
            loss = eps_loss(net, x0, t, noise, schedule, y=y)
            if not torch.isfinite(loss):
                raise TrainingError(f"loss is {loss.item()} at step {step}; stopped. The last good checkpoint "
                                    f"(step {last_save}) is kept in {ckpt}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
            opt.step()
            d = min(cfg.ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                for pe, p in zip(ema.parameters(), net.parameters(), strict=True):
                    pe.lerp_(p, 1 - d)
            step += 1
            losses.append(round(loss.item(), 5))
            show(step, float(np.mean(losses[-50:])))
            elapsed = time.perf_counter() - t_start
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                save_checkpoint(ckpt, net, ema, opt, {**header(), "wall_seconds": round(wall + elapsed, 2)})
                last_save = step
                if max_minutes is not None and elapsed > 60 * max_minutes and step < cfg.steps:
                    break
    wall += time.perf_counter() - t_start
    record = {
        "command": command or " ".join(sys.argv),
        "commit": git_commit(),
        "config": cfg.to_dict(),
        "steps_done": step,
        "finished": step >= cfg.steps,
        "wall_seconds": round(wall, 1),
        "final_loss": float(np.mean(losses[-100:])) if losses else None,
        "machine": machine_info(),
        "data": {"source": data.id, "n": len(data), "content_hash": data.content_hash,
                 "sample_hashes": sorted(data.sample_hashes)},
    }
    if record["finished"]:
        Backbone(ema.eval(), schedule, codec).save_pretrained(out, record=record)
    return record


def pretrain(cfg: PretrainConfig, out: str | Path, **kwargs) -> dict:
    """Train (or resume) a backbone in ``out``; when ``cfg.steps`` are done, write the shipped bundle there.

    ``out/checkpoint.safetensors`` holds the resumable state; ``max_minutes`` stops early after a checkpoint
    (train in chunks); ``on_batch(images)`` sees every training batch (tests use it). Returns the training
    record (``finished`` says whether all steps are done). Deterministic kernels are on inside, restored after.
    """
    with deterministic_algorithms():
        return _pretrain(cfg, out, **kwargs)
