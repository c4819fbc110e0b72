"""From a denoiser to stored-format images: noise -> solver -> codec.decode.

Works with any denoiser callable (the backbone, a compartment, a composed model), so every later feature
samples through this one function.
"""

from __future__ import annotations

import numpy as np
import torch

from .backbone import Backbone, Codec
from .sampling import Denoiser, NoiseSchedule, classifier_free_guidance, sample

__all__ = ["MAX_SAMPLES", "class_labels", "generate", "sample_backbone"]

MAX_SAMPLES = 100_000  # one call; larger requests are refused rather than exhausting memory


def generate(
    eps: Denoiser,
    *,
    schedule: NoiseSchedule,
    codec: Codec,
    labels: np.ndarray | None = None,
    n: int | None = None,
    null_class: int | None = None,
    text: torch.Tensor | None = None,
    null_text: torch.Tensor | None = None,
    guidance: float = 1.0,
    solver: str = "ddim",
    steps: int = 50,
    seed: int = 0,
    bf16: bool = False,
    batch_size: int = 250,
    in_chans: int | None = None,
    progress: bool = False,
    trajectories: list | None = None,
    clip: bool | None = None,
    device: torch.device | str | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Draw images. Class-conditional when ``labels`` is given (one image per label), text-conditioned when
    ``text`` (N, dim) caption embeddings are (one image per row; ``null_text`` (dim,), the empty caption's, is
    guidance's unconditional branch), else ``n`` unconditional images.

    The initial noise of all images comes from one generator seeded with ``seed``, so deterministic solvers
    do not depend on ``batch_size``. A stateful denoiser (a composed one: path state, gates, weights) is
    ``reset()`` before each batch; if ``trajectories`` is a list, each batch's weight trajectory is appended.
    ``clip``: clip x_0 predictions to [-1, 1], or to [-r, r] for a number r (default: the codec's
    ``x0_range``; None there: no clipping). ``in_chans``:
    the model's channels (default: the codec's). ``device``: where the noise, the conditions and the solver's state
    live (default: the CPU); pass the backbone's (``backbone.device``, as :func:`sample_backbone` and
    ``cdm.operations.generate_from_store`` do). The noise is drawn on the CPU and moved, so a device changes no
    draw; the images come back on the CPU.
    """
    if sum(v is not None for v in (labels, n, text)) != 1:
        raise ValueError("give exactly one of labels (class-conditional), text (captions) or n (unconditional)")
    count = len(labels) if labels is not None else len(text) if text is not None else int(n)
    if not 1 <= count <= MAX_SAMPLES:
        raise ValueError(f"number of images must be in 1..{MAX_SAMPLES}, got {count}")
    clip = (codec.x0_range or False) if clip is None else clip
    in_chans = codec.model_channels if in_chans is None else in_chans
    base = eps
    if guidance != 1.0:
        if text is not None:
            if null_text is None:
                raise ValueError("classifier-free guidance on captions needs the empty caption's embedding")
            eps = classifier_free_guidance(eps, guidance, {"text": null_text})
        elif labels is None or null_class is None:
            raise ValueError("classifier-free guidance needs labels and a null class")
        else:
            eps = classifier_free_guidance(eps, guidance, {"y": null_class})
    dev = torch.device("cpu") if device is None else torch.device(device)
    step_noise = torch.Generator().manual_seed(seed + 1)  # for stochastic solvers (CPU draws, moved by the solver)
    m = codec.model_size
    noise = torch.randn((count, in_chans, m, m), generator=torch.Generator().manual_seed(seed))
    y_all = None if labels is None else torch.as_tensor(np.asarray(labels), dtype=torch.long).to(dev)
    text = None if text is None else text.to(dev)
    out = []
    chunks = range(0, count, batch_size)
    if progress:
        from rich.progress import track

        chunks = track(chunks, description=f"sampling {count} images")
    for s in chunks:
        cond = {} if y_all is None else {"y": y_all[s:s + batch_size]}
        if text is not None:
            cond["text"] = text[s:s + batch_size]
        if hasattr(base, "reset"):
            base.reset()
        x = sample(eps, noise[s:s + batch_size].to(dev), schedule=schedule, solver=solver, steps=steps, cond=cond,
                   bf16=bf16, generator=step_noise, clip=clip)
        out.append(codec.decode(x.cpu()))
        if trajectories is not None and hasattr(base, "trajectory"):
            trajectories.append(base.trajectory())
    return np.concatenate(out), (None if labels is None else np.asarray(labels, dtype=np.int64))


def class_labels(backbone: Backbone, classes: list[int] | None = None, per_class: int = 10) -> np.ndarray:
    """``per_class`` labels of each class in ``classes`` (default: every real class, i.e. every label but the
    null one), checked against the backbone. ValueError for a class it lacks or an unconditional backbone."""
    c = backbone.config
    if classes is None:
        classes = [k for k in range(max(c.num_classes, 0)) if k != c.null_class]
        if not classes:
            raise ValueError("this backbone is unconditional: ask for n unconditional images")
    bad = [k for k in classes if not 0 <= k < c.num_classes or k == c.null_class]
    if bad:
        raise ValueError(f"classes {bad} are not classes of this backbone (0..{c.num_classes - 1}, null class "
                         f"{c.null_class} excluded)")
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    return np.repeat(np.asarray(classes, dtype=np.int64), per_class)


def sample_backbone(backbone: Backbone, per_class: int = 10, classes: list[int] | None = None,
                    eps: Denoiser | None = None, **kwargs):
    """``per_class`` images of each class (default: all real classes, i.e. every label but the null one), from
    the backbone or from ``eps`` (e.g. a compartment's denoiser on this backbone), sampled on the backbone's
    device."""
    c = backbone.config
    kwargs.setdefault("device", backbone.device)
    return generate(eps or backbone.eps, schedule=backbone.schedule, codec=backbone.codec,
                    labels=class_labels(backbone, classes, per_class), null_class=c.null_class, in_chans=c.in_chans,
                    **kwargs)
