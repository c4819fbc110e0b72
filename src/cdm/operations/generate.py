"""Generating from a store: compose stored compartments into one denoiser, and the one way to draw images from
the backbone, one compartment or a composition (:func:`generate_from_store`), with a typed result."""

from __future__ import annotations

import time

import numpy as np

from ..backbone import Backbone
from ..compartments import Compartment
from ..errors import CdmError
from ..store import Store, StoreError
from .results import CompartmentUsed, Generation
from .sources import load_compartment, source_data

__all__ = ["UNCONDITIONAL", "caption_condition", "class_counts", "compose", "generate_from_store", "mixture_labels"]

UNCONDITIONAL = ("mixture", "null")  # how unconditional images are drawn from class-conditional compartments

def compose(store: Store, backbone: Backbone, names: list[str], *, weighting: str = "ito", threshold: float = 0.0,
            priors: list[float] | None = None, seed: int = 0, class_conditional_priors: bool = True,
            compartments: list[Compartment] | None = None):
    """A composed denoiser over stored compartments (default priors: proportional to source size).

    ``weighting``: ``ito``, ``naive``, ``single``, or a learned one read from the store: ``router`` (stored cid
    "router"), ``classifier`` (cid "noisy-classifier"), both trained on these sources or a superset (their
    logits for the requested sources are used, in order), or ``isolated`` (each source's own head
    "<source>.head"). Missing learned weights: a :class:`CdmError` naming the ``cdm train-router`` command.
    Class-conditional compartments get per-class priors ``lambda_i(y)`` proportional to source i's samples of
    class y (``class_conditional_priors``); ``priors`` apply to the unconditional (null-class) branch."""
    from ..composition import CompartmentBank, ComposedDenoiser
    from ..composition.registry import WeightingContext, create_weighting, spec
    from .learned import load_weighting

    spec(weighting)  # unknown -> CdmError naming the known ones
    if not names:
        raise CdmError("no sources to compose")
    comps = compartments if compartments is not None else [load_compartment(store, backbone, n) for n in names]
    if priors is None:
        priors = [float(store.source(n)["n"]) for n in names]
    class_priors = class_counts(store, names, comps) if class_conditional_priors else None
    w = create_weighting(weighting, WeightingContext(schedule=backbone.schedule, seed=seed,
                                                     load=lambda kind: load_weighting(store, backbone, names, kind)))
    return ComposedDenoiser(CompartmentBank(backbone, comps), w, priors=priors, class_priors=class_priors,
                            threshold=threshold)


class _Tally:
    """A composed denoiser that keeps its evaluation count over the batches :func:`generate` resets it for."""

    def __init__(self, inner):
        self.inner, self._done = inner, 0

    def __call__(self, x, t, **cond):
        return self.inner(x, t, **cond)

    def reset(self) -> None:
        self._done += self.inner.evals
        self.inner.reset()

    def trajectory(self):
        return self.inner.trajectory()

    @property
    def total(self) -> int:
        return int(self._done + self.inner.evals)


def generate_from_store(store: Store | None, backbone: Backbone, sources: list[str] | tuple[str, ...] = (), *,
                        labels=None, n: int | None = None, weighting: str = "ito", solver: str | None = None,
                        steps: int = 50, guidance: float = 1.0, seed: int = 0, threshold: float = 0.0,
                        priors: list[float] | None = None, bf16: bool = False, batch_size: int = 250,
                        progress: bool = False, denoiser_hook=None, compose_seed: int | None = None,
                        captions: list[str] | None = None, class_priors: bool = True,
                        unconditional: str = "mixture") -> Generation:
    """The one way to generate: from the backbone (no sources), one compartment (its own denoiser), or the
    composition of stored compartments ``sources`` with ``weighting``. Class-conditional with ``labels`` (one
    image per label), text-conditioned with ``captions`` (one image per caption; text compartments only, embedded
    with their encoder; guidance's unconditional branch is the empty caption), else ``n`` unconditional images.
    ``solver`` None: what the weighting needs (:func:`~cdm.composition.registry.resolve_solver`).
    ``denoiser_hook(eps) -> eps`` wraps the denoiser (the service watches it for divergence). ``compose_seed``:
    the seed of the composition's own draws (the single weighting's choice of source; default ``seed``).

    ``class_priors``: class-conditional compositions weight source i for class y by its share of class y
    (lambda_i(y), the default); False uses the sources' data shares for every class (the paper's naive baseline
    then mixes compartments that never saw y). ``unconditional``: how ``n`` unconditional images are drawn from
    class-conditional compartments. ``"mixture"`` (default) draws each image's class from the sources' pooled
    class counts (seeded by ``compose_seed``) and generates it class-conditionally, so the images follow the
    sources' own class mixture; ``"null"`` uses the compartments' null-class prompt row, which stays close to the
    public backbone (few confident samples; measured in the benchmark's ``unconditional`` part)."""
    from ..composition.registry import resolve_solver
    from ..generation import generate

    sources = list(dict.fromkeys(sources))
    if sources and store is None:
        raise CdmError("sources given without a store")
    if unconditional not in UNCONDITIONAL:
        raise CdmError(f"unconditional must be one of {', '.join(UNCONDITIONAL)}, got {unconditional!r}")
    solver = resolve_solver(weighting, len(sources), solver)
    composed, used, eps = None, [], backbone.eps
    text = null_text = None
    if captions is not None:
        if labels is not None or not captions:
            raise CdmError("give captions or labels, not both, and at least one caption")
        text, null_text = caption_condition(store, sources, captions)
        n = None
    if sources:
        rows = {r["cid"]: r for r in store.compartments()}
        comps = [load_compartment(store, backbone, s) for s in sources]
        if len(sources) == 1:  # one compartment: its own denoiser, nothing to weigh
            eps = comps[0].denoiser(backbone)
        else:
            composed = compose(store, backbone, sources, weighting=weighting, threshold=threshold, priors=priors,
                               seed=seed if compose_seed is None else compose_seed,
                               class_conditional_priors=class_priors, compartments=comps)
        used = [CompartmentUsed(s, rows[s]["weights_sha256"]) for s in sources]
        if labels is None and text is None and unconditional == "mixture":
            labels = mixture_labels(store, sources, comps, n, seed if compose_seed is None else compose_seed)
    tally = _Tally(composed) if composed is not None else None
    eps = tally if tally is not None else eps
    if denoiser_hook is not None:
        eps = denoiser_hook(eps)
    labels = None if labels is None else np.asarray(labels, dtype=np.int64)
    if labels is None and text is None and guidance != 1.0:
        guidance = 1.0  # guidance needs a class or a caption to guide towards
    trajectories: list = []
    t0 = time.perf_counter()
    images, labels = generate(eps, schedule=backbone.schedule, codec=backbone.codec, labels=labels,
                              n=None if labels is not None or text is not None else n,
                              null_class=backbone.config.null_class, text=text, null_text=null_text,
                              guidance=guidance, solver=solver, steps=steps, seed=seed, bf16=bf16,
                              batch_size=batch_size, in_chans=backbone.config.in_chans, progress=progress,
                              trajectories=trajectories, device=backbone.device)
    seconds = time.perf_counter() - t0
    weights = None
    if composed is not None:
        # each batch's trajectory is (calls, B or 2B with guidance: conditional half first, sources)
        parts, done = [], 0
        for traj in trajectories:
            rows_b = min(batch_size, len(images) - done)
            parts.append(traj.numpy()[:, :rows_b])
            done += rows_b
        weights = np.concatenate(parts, axis=1)
    return Generation(images=images, labels=labels, sources=sources, compartments=used,
                      weighting=weighting if len(sources) > 1 else None, solver=solver, steps=steps, seed=seed,
                      guidance=guidance, weights=weights, evals=tally.total if tally is not None else None,
                      seconds=seconds, captions=None if captions is None else list(captions))


def caption_condition(store: Store | None, sources: list[str], captions: list[str]):
    """``(embeddings (N, dim), empty caption's (dim,))`` with the encoder of the text compartments ``sources``."""
    from ..compartments import CompartmentConfig
    from ..text import caption_embeddings

    if not sources:
        raise CdmError("the backbone alone cannot read captions: name text-conditioned compartments (--sources)")
    encoders = {CompartmentConfig.from_dict(store.compartment(s)["manifest"]["config"]).text_encoder for s in sources}
    if None in encoders or len(encoders) != 1:
        raise CdmError(f"captions need text-conditioned compartments with one text encoder; {', '.join(sources)} "
                       f"have {sorted(map(str, encoders))} (train them with `cdm add --text`)")
    bad = [c for c in captions if not isinstance(c, str) or len(c) > 1000]
    if bad:
        raise CdmError("each caption must be a string of at most 1000 characters")
    emb = caption_embeddings(captions, encoders.pop())
    return emb.rows, emb.empty


def class_counts(store: Store, names: list[str], comps: list[Compartment]) -> np.ndarray | None:
    """(sources, classes) sample counts from the stored samples, for lambda_i(y) = n_i(y) / sum_j n_j(y): a
    source that holds no sample of class y gets no weight for y (its class-y prompts were never trained, so
    they are only the public backbone). None when the compartments are unconditional or data is missing."""
    if not comps or not all(c.config.conditional for c in comps):
        return None
    counts = np.zeros((len(names), comps[0].num_classes), dtype=np.float64)
    for i, n in enumerate(names):
        key = (store.source(n)["content_hash"], counts.shape[1])  # covers images and labels
        if key not in _COUNTS:
            imported = store.compartment(n)["manifest"].get("imported")
            if imported is not None:  # trained where the data lives: the bundle's verified class counts
                held = imported.get("class_counts")
                if held is None:
                    return None
                classes = store.source(n)["classes"]
                _COUNTS[key] = np.array([held.get(str(c), 0) for c in classes], dtype=np.int64)[: counts.shape[1]]
            else:
                try:
                    labels = source_data(store, n).labels
                except StoreError:
                    return None
                if labels is None:
                    return None
                _COUNTS[key] = np.bincount(labels, minlength=counts.shape[1])[: counts.shape[1]]
        counts[i] = _COUNTS[key]
    return counts


def mixture_labels(store: Store, names: list[str], comps: list[Compartment], n: int | None,
                   seed: int) -> np.ndarray | None:
    """``n`` classes drawn from the pooled class counts of sources ``names`` (seeded), for unconditional images from
    class-conditional compartments; None when they are not class-conditional (their own unconditional row is
    then the only one) or their labels are not held."""
    counts = class_counts(store, names, comps)
    if counts is None or n is None:
        return None
    if n < 1:
        raise CdmError(f"n must be at least 1, got {n}")
    pooled = counts.sum(0)
    rng = np.random.default_rng(seed)
    return rng.choice(len(pooled), size=int(n), p=pooled / pooled.sum()).astype(np.int64)


# Class counts by (source content hash, classes): compose() runs per service request and must not reread every
# source's samples each time. Keyed by content, so a forgotten-then-readded or sample-forgotten source misses.
_COUNTS: dict[tuple[str, int], np.ndarray] = {}
