"""Training cdm's own autoencoder on PUBLIC data only (``cdm train-autoencoder``).

No pretrained image autoencoder installs offline, so cdm trains a small one. Public data (nothing of the four
protected emoji artists, nothing of the protected digits):

* the Noto emoji (Apache-2.0; the public artist of the emoji benchmark);
* synthetic font glyphs (letters and digits) and the 1,000 public MNIST digits, coloured: ink and paper drawn
  from a seeded generator, so the autoencoder sees strokes and outlines in every colour, on light and dark.

Augmented per step (horizontal flip, channel permutation, a shift of up to 2 pixels). Loss: L1 + MSE on pixels
plus a small KL term (latent diffusion's recipe without the perceptual and adversarial terms, which need
pretrained networks). After training, ``shift`` and ``scale`` are set so the training latents have mean 0 and
standard deviation 1 (Stable Diffusion's 0.18215 was found the same way). Deterministic given the seed.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..data.emoji import emoji
from ..data.glyphs import glyphs
from ..data.mnist import public_protected
from ..errors import TrainingError
from ..provenance import git_commit, machine_info
from .model import Autoencoder, small_autoencoder

__all__ = ["AutoencoderTrainConfig", "psnr", "psnr_report", "public_autoencoder_set", "reconstruct",
           "train_autoencoder"]


@dataclass(frozen=True)
class AutoencoderTrainConfig:
    widths: tuple[int, ...] = (16, 32, 64)  # channels per level; factor 2 ** (levels - 1)
    latent_channels: int = 4  # channels of the latent (SD's: 4)
    size: int = 32  # side of the training images (the emoji's)
    glyphs: int = 3000  # coloured font glyphs (letters and digits) beside Noto and the public digits
    steps: int = 3000  # optimiser steps
    batch_size: int = 32
    lr: float = 1e-3  # Adam peak learning rate; 100 warm-up steps, cosine to 5%
    kl_weight: float = 1e-6  # weight of KL(q(z|x) || N(0, I)) per latent element, against L1 + MSE per pixel
    seed: int = 0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["widths"] = list(self.widths)
        return d


def _colour(grey: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Grey ink-on-black images (N, h, w) -> RGB (N, size, size, 3): random ink on random paper, centred."""
    n, h, w = grey.shape
    a = grey.astype(np.float32)[..., None] / 255.0
    ink = rng.integers(0, 256, (n, 1, 1, 3)).astype(np.float32)
    paper = np.where(rng.random((n, 1, 1, 1)) < 0.5, 255.0, rng.integers(0, 256, (n, 1, 1, 3))).astype(np.float32)
    img = paper * (1 - a) + ink * a
    out = np.broadcast_to(paper, (n, size, size, 3)).copy()
    top, left = (size - h) // 2, (size - w) // 2
    out[:, top:top + h, left:left + w] = img
    return np.round(out).astype(np.uint8)


def public_autoencoder_set(cfg: AutoencoderTrainConfig) -> tuple[np.ndarray, dict]:
    """uint8 (N, size, size, 3): Noto, coloured glyphs, coloured public digits; and what went in."""
    rng = np.random.default_rng([cfg.seed, 7])
    noto = emoji("noto")
    if noto.images.shape[1] != cfg.size:
        raise TrainingError(f"the autoencoder trains at the emoji size {noto.images.shape[1]}, not {cfg.size}")
    parts = {"emoji:noto": noto.images}
    if cfg.glyphs:
        g = glyphs(cfg.glyphs, seed=cfg.seed, charset="all")
        parts[g.id + " (coloured)"] = _colour(g.images, cfg.size, rng)
    public, _ = public_protected()
    parts[public.id + " (coloured)"] = _colour(public.images, cfg.size, rng)
    images = np.concatenate(list(parts.values()))
    return images, {"parts": {k: len(v) for k, v in parts.items()}, "n": len(images)}


def _batch(images: np.ndarray, idx: np.ndarray, g: np.random.Generator) -> torch.Tensor:
    x = torch.from_numpy(images[idx]).float().permute(0, 3, 1, 2) / 127.5 - 1.0
    flip = torch.from_numpy(g.random(len(idx)) < 0.5)
    x[flip] = x[flip].flip(-1)
    perm = torch.from_numpy(np.stack([g.permutation(3) for _ in idx]))
    x = torch.gather(x, 1, perm[:, :, None, None].expand_as(x))
    dx, dy = g.integers(-2, 3, 2)
    x = torch.roll(x, (int(dy), int(dx)), dims=(2, 3))
    return x


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio (dB) of uint8 image sets, over all pixels."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * math.log10(255.0 ** 2 / mse))


def reconstruct(ae: Autoencoder, images: np.ndarray) -> np.ndarray:
    """uint8 images (grey or RGB) through the autoencoder and back, in their own format: what latent mode's codec
    does to them."""
    return ae.decode_images(ae.encode_images(images), grey=images.ndim == 3)


def psnr_report(ae: Autoencoder) -> dict[str, float]:
    """Reconstruction PSNR (dB) on each emoji artist (the four protected ones were never trained on) and on the
    protected digits (28x28 grey: through the autoencoder as RGB, back to grey)."""
    from ..data.emoji import ARTISTS

    out = {f"emoji:{a}": round(psnr(emoji(a).images, reconstruct(ae, emoji(a).images)), 3) for a in ARTISTS}
    _, protected = public_protected()
    out[protected.id] = round(psnr(protected.images, reconstruct(ae, protected.images)), 3)
    return out


def train_autoencoder(cfg: AutoencoderTrainConfig, out: str | Path, *, progress: bool = True,
                      command: str | None = None, evaluate: bool = True) -> tuple[Autoencoder, dict]:
    """Train on :func:`public_autoencoder_set`, set scale and shift, save to ``out``; returns it and its record
    (with ``evaluate``, the :func:`psnr_report`)."""
    images, data = public_autoencoder_set(cfg)
    torch.manual_seed(cfg.seed)
    net = small_autoencoder(latent_channels=cfg.latent_channels, widths=cfg.widths,
                            groups=math.gcd(8, *cfg.widths))  # group norm: 8 groups, fewer for tiny widths
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    g = np.random.default_rng([cfg.seed, 11])
    t0, losses = time.perf_counter(), []
    net.train()
    for step in range(cfg.steps):
        warm = min(1.0, (step + 1) / 100)
        lr = cfg.lr * warm * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / cfg.steps)))
        for group in opt.param_groups:
            group["lr"] = lr
        x = _batch(images, g.integers(0, len(images), cfg.batch_size), g)
        post = net.encode(x).latent_dist
        y = net.decode(post.sample(generator=None)).sample
        kl = post.kl().mean() / post.mean[0].numel()
        loss = (y - x).abs().mean() + ((y - x) ** 2).mean() + cfg.kl_weight * kl
        if not torch.isfinite(loss):
            raise TrainingError(f"autoencoder loss is {loss.item()} at step {step}; stopped")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if progress and (step + 1) % 100 == 0:
            print(f"autoencoder step {step + 1}/{cfg.steps} loss {np.mean(losses[-100:]):.4f} "
                  f"{time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)
    wall = time.perf_counter() - t0
    net.eval()
    with torch.no_grad():  # latent statistics of the (unaugmented) training images -> shift and scale
        x = torch.from_numpy(images).float().permute(0, 3, 1, 2) / 127.5 - 1.0
        z = torch.cat([net.encode(x[i:i + 256]).latent_dist.mode() for i in range(0, len(x), 256)])
    net.register_to_config(shift_factor=round(float(z.mean()), 6), scaling_factor=round(1.0 / float(z.std()), 6))
    ae = Autoencoder(net)
    record = {"command": command or " ".join(sys.argv), "commit": git_commit(), "config": cfg.to_dict(),
              "data": data, "steps_done": cfg.steps, "wall_seconds": round(wall, 1),
              "final_loss": round(float(np.mean(losses[-100:])), 5), "machine": machine_info(),
              "latent_stats": {"mean": round(float(z.mean()), 6), "std": round(float(z.std()), 6)},
              "psnr_public": round(psnr(images, reconstruct(ae, images)), 3)}
    if evaluate:
        record["psnr"] = psnr_report(ae)
    ae.save_pretrained(out, record=record)
    return Autoencoder.from_pretrained(out), record
