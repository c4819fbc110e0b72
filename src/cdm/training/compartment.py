"""Training one compartment on one source (``cdm train``): the backbone's epsilon loss, prompts only.

Deterministic given (source content, config, seed): the source is first put in canonical order (by sample
hash, then label), so the result depends on *which* samples are in it, not on their order; every step draws
its batch, timesteps, noise and label dropout from a generator seeded by ``(seed, step)``. Hence retraining a
compartment on a source minus some samples is bit-identical to training on that reduced source directly
(exact forgetting), and a resumed run equals an uninterrupted one (same machine, same thread count).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from collections.abc import Callable

import numpy as np
import torch

from ..backbone import Backbone, Codec
from ..compartments import Compartment, CompartmentConfig
from ..data import Source
from ..errors import DataError, TrainingError
from ..provenance import git_commit, machine_info
from ..text import CaptionEmbeddings, caption_embeddings
from .checkpoint import load_checkpoint, save_checkpoint
from .record import TrainingRecord
from .common import deterministic_algorithms, lr_at, progress_bar, step_generator
from .loss import draw_noise, eps_loss, held_out_loss

__all__ = ["TrainingRecord", "caption_inputs", "canonical_index", "canonical_order", "check_source_fits", "model_space",
           "train_compartment", "training_record"]

_TAG = "cdm-compartment"


def canonical_index(source: Source) -> np.ndarray:
    """The row order of :func:`canonical_order`: by (sample hash, label), the order content hashes use."""
    labels = source.labels if source.labels is not None else np.zeros(len(source), dtype=np.int64)
    return np.asarray(sorted(range(len(source)), key=lambda i: (source.sample_hashes[i], int(labels[i]))),
                      dtype=np.int64)


def canonical_order(source: Source) -> Source:
    """The source with its samples sorted by (sample hash, label): training sees content, not order."""
    return source.subset(canonical_index(source), id=source.id)


def model_space(codec: Codec, source: Source, inputs: torch.Tensor | None = None) -> tuple[Source, torch.Tensor]:
    """``(source in canonical order, its rows in the codec's model space)``. ``inputs``: the source's rows already
    encoded (cached latents, ``operations.model_inputs``), in the source's own order; else ``codec`` encodes them.
    Encoding is per image, so both give the same tensor bit for bit."""
    order = canonical_index(source)
    data = source.subset(order, id=source.id)
    if inputs is None:
        return data, codec.encode(data.images)
    want = (len(source), codec.model_channels, codec.model_size, codec.model_size)
    if tuple(inputs.shape) != want:
        raise DataError(f"{source.id}: encoded inputs are {tuple(inputs.shape)}, expected {want}")
    return data, inputs[torch.from_numpy(order)]


def caption_inputs(cfg: CompartmentConfig, source: Source, text: CaptionEmbeddings | None = None
                   ) -> CaptionEmbeddings | None:
    """A text compartment's caption embeddings in canonical order (``text``: the source's, in its own order, e.g.
    cached in a store; else the config's encoder embeds them); None for other compartments."""
    if not cfg.text:
        return None
    if text is None:
        text = caption_embeddings(source.captions, cfg.text_encoder)
    if text.encoder != cfg.text_encoder or tuple(text.rows.shape[:1]) != (len(source),):
        raise DataError(f"{source.id}: caption embeddings of {text.encoder} for {text.rows.shape[0]} rows, expected "
                        f"{cfg.text_encoder} for {len(source)}")
    return text.subset(canonical_index(source))


def split_validation(data: Source, share: float) -> tuple[np.ndarray, np.ndarray | None]:
    """(training rows, validation rows or None): the ``share`` of samples with the smallest hashes, at least one
    and never all; none when ``share`` is 0 or the source has fewer than 10 samples. Depends on content only."""
    n_val = int(round(share * len(data)))
    if share <= 0 or len(data) < 10 or n_val < 1:
        return np.arange(len(data)), None
    order = np.argsort(np.asarray(data.sample_hashes), kind="stable")
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def check_source_fits(source: Source, compartment: Compartment) -> None:
    if len(source) == 0:
        raise DataError(f"{source.id}: the source is empty")
    if compartment.config.text and source.captions is None:
        raise DataError(f"{source.id}: a text-conditioned compartment needs captions (an .npz with a 'captions' "
                        "array, or shipped data: emoji, digits, glyphs)")
    if compartment.config.conditional:
        if source.labels is None:
            raise DataError(f"{source.id}: a class-conditional compartment needs labels (or use --unconditional)")
        if int(source.labels.max()) >= compartment.num_classes:
            raise DataError(f"{source.id}: label {int(source.labels.max())} but the backbone has "
                            f"{compartment.num_classes} classes")


def _train_compartment(
    backbone: Backbone,
    source: Source,
    cfg: CompartmentConfig,
    *,
    work_dir: str | Path | None = None,
    max_minutes: float | None = None,
    progress: bool = True,
    on_batch: Callable[[np.ndarray], None] | None = None,
    inputs: torch.Tensor | None = None,
    text: CaptionEmbeddings | None = None,
) -> tuple[Compartment | None, TrainingRecord]:
    """Train a compartment; returns ``(compartment, record)``, or ``(None, record)`` if ``max_minutes`` paused it.

    ``work_dir`` (optional) holds the resumable checkpoint; a finished run leaves it for the caller to clear.
    The backbone is frozen and never written. Everything runs on the backbone's device (prompts, optimiser,
    data, noise); the random draws are made on the CPU from the per-step generators and moved there.
    """
    lr_at(0, lr=cfg.lr, warmup=cfg.warmup, steps=cfg.steps, schedule=cfg.lr_schedule)  # validates the schedule
    backbone.freeze()
    dev = backbone.device
    comp = Compartment.for_backbone(backbone, cfg)
    check_source_fits(source, comp)
    data, x_all = model_space(backbone.codec, source, inputs)
    captions = caption_inputs(cfg, source, text)  # in data's (canonical) order, or None
    train_idx, val_idx = split_validation(data, cfg.validation)
    val = None
    if val_idx is not None:
        val = (x_all[torch.from_numpy(val_idx)].to(dev),
               torch.tensor(data.labels[val_idx], dtype=torch.long).to(dev) if cfg.conditional else None,
               None if captions is None else captions.rows[torch.from_numpy(val_idx)].to(dev))
        data, x_all = data.subset(train_idx, id=data.id), x_all[torch.from_numpy(train_idx)]
        captions = None if captions is None else captions.subset(train_idx)
    y_all = torch.tensor(data.labels if data.labels is not None else np.zeros(len(data)), dtype=torch.long)
    x_all, y_all = x_all.to(dev), y_all.to(dev)
    cap_rows = None if captions is None else captions.rows.to(dev)
    cap_empty = None if captions is None else captions.empty.to(dev)
    comp.init_prompts(step_generator(_TAG + "/init", cfg.seed, 0))  # drawn on the CPU
    comp.to(dev)
    opt = torch.optim.Adam(comp.parameters(), lr=cfg.lr)
    best = Compartment.for_backbone(backbone, cfg).to(dev)  # the prompts of the best validated step so far
    best.load_state_dict(comp.state_dict())
    step, wall, losses, curve = 0, 0.0, [], []
    ckpt = Path(work_dir) / "checkpoint.safetensors" if work_dir is not None else None
    if ckpt is not None and ckpt.exists():
        header = load_checkpoint(ckpt, comp, best, opt)
        if header.get("config") != cfg.to_dict() or header.get("content_hash") != source.content_hash \
                or header.get("backbone_hash") != backbone.hash:
            raise TrainingError(f"{ckpt}: belongs to another source, config or backbone; clear it to start over")
        step, wall, losses, curve = header["step"], header["wall_seconds"], header["recent_losses"], header["curve"]

    def header(wall_now: float) -> dict:
        return {"config": cfg.to_dict(), "content_hash": source.content_hash, "backbone_hash": backbone.hash,
                "step": step, "wall_seconds": round(wall_now, 2), "recent_losses": losses[-100:], "curve": curve}

    def validate() -> None:
        if val is None:
            return
        comp.eval()
        loss = held_out_loss(comp.denoiser(backbone), val[0], backbone.schedule, y=val[1], draws=8, seed=cfg.seed,
                             text=val[2])
        comp.train()
        if not curve or loss < min(v for _, v in curve):
            best.load_state_dict(comp.state_dict())
        curve.append((step, round(loss, 6)))

    if step == 0:
        validate()

    t_start = time.perf_counter()
    last_save = step
    comp.train()
    with progress_bar(f"compartment {source.id}", cfg.steps, step, progress) as show:
        while step < cfg.steps:
            g = step_generator(_TAG, cfg.seed, step)
            idx = torch.randint(0, len(data), (cfg.batch_size,), generator=g)
            if on_batch is not None:
                on_batch(data.images[idx.numpy()])
            at = idx.to(dev)
            x0, rows = x_all[at], y_all[at].clone()
            cond = {}
            if cfg.conditional:
                rows[(torch.rand(cfg.batch_size, generator=g) < cfg.label_dropout).to(dev)] = comp.null_class
                cond["y"] = rows
            elif captions is not None:  # the empty caption on a label_dropout share: the unconditional branch
                drop = (torch.rand(cfg.batch_size, generator=g) < cfg.label_dropout).to(dev)
                cond["text"] = torch.where(drop[:, None], cap_empty[None], cap_rows[at])
            t, noise = draw_noise(x0, backbone.schedule, g)
            for group in opt.param_groups:
                group["lr"] = lr_at(step, lr=cfg.lr, warmup=cfg.warmup, steps=cfg.steps, schedule=cfg.lr_schedule)
            loss = eps_loss(comp.denoiser(backbone), x0, t, noise, backbone.schedule, **cond)
            value = loss.item()  # one host sync per step on an accelerator
            if not math.isfinite(value):
                raise TrainingError(f"loss is {value} at step {step} of compartment {source.id!r}; stopped"
                                    + (f" (last good checkpoint: step {last_save})" if ckpt else ""))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(comp.parameters(), cfg.grad_clip)
            opt.step()
            step += 1
            losses.append(round(value, 5))
            show(step, float(np.mean(losses[-50:])))
            if step % cfg.validate_every == 0 or step == cfg.steps:
                validate()
            elapsed = time.perf_counter() - t_start
            if ckpt is not None and (step % cfg.checkpoint_every == 0 or step == cfg.steps):
                ckpt.parent.mkdir(parents=True, exist_ok=True)
                save_checkpoint(ckpt, comp, best, opt, header(wall + elapsed))
                last_save = step
                if max_minutes is not None and elapsed > 60 * max_minutes and step < cfg.steps:
                    break
    wall += time.perf_counter() - t_start
    if val is not None and step >= cfg.steps:
        comp.load_state_dict(best.state_dict())
    comp.eval()
    best_step, best_loss = min(curve, key=lambda c: c[1]) if curve else (None, None)
    record = training_record(backbone, source, cfg, step=step, wall=wall, losses=losses, dp=None, validation=None
                             if val is None else {"n": int(val[0].shape[0]), "best_step": best_step,
                                                  "best_loss": best_loss, "start_loss": curve[0][1], "curve": curve})
    return (comp if record.finished else None), record


def training_record(backbone: Backbone, source: Source, cfg: CompartmentConfig, *, step: int, wall: float,
                    losses: list[float], dp: dict | None, validation: dict | None) -> TrainingRecord:
    """The record of a compartment training run (plain or DP): what it saw, how, where, when."""
    return TrainingRecord(
        source={"id": source.id, "content_hash": source.content_hash, "n": len(source),
                "sample_hashes": sorted(source.sample_hashes)},
        backbone_hash=backbone.hash,
        config=cfg.to_dict(),
        seed=cfg.seed,
        steps_done=step,
        finished=step >= cfg.steps,
        wall_seconds=round(wall, 2),
        final_loss=float(np.mean(losses[-100:])) if losses else None,
        commit=git_commit(),
        machine=machine_info(),
        dp=dp,
        validation=validation,
        learned=bool(step > 0 and not (validation is not None and validation.get("best_step") == 0)),
    )


def train_compartment(backbone: Backbone, source: Source, cfg: CompartmentConfig,
                      **kwargs) -> tuple[Compartment | None, TrainingRecord]:
    """Train a compartment; returns ``(compartment, record)``, or ``(None, record)`` if ``max_minutes`` paused it.

    Keywords: ``work_dir`` (resumable checkpoint; a finished run leaves it for the caller to clear),
    ``max_minutes``, ``progress``, ``on_batch``, ``inputs`` (the source's rows already in the backbone's space,
    e.g. cached latents), ``text`` (a text compartment's caption embeddings, rows in the source's order, e.g.
    cached in a store; default: embedded here). The backbone is frozen and never written. Deterministic kernels
    are on inside, restored after.
    """
    with deterministic_algorithms():
        return _train_compartment(backbone, source, cfg, **kwargs)
