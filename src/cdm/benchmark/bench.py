"""What the benchmark's parts share: the backbone, the judge, the protected digits, stores and sampling."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from .. import operations as ops
from ..backbone import Backbone
from ..compartments import CompartmentConfig
from ..data import load_source, public_protected, split_by_classes, split_stratified
from ..evaluation import DigitClassifier, FIDScorer
from ..store import Store
from ..viz import write_samples
from .profiles import DOMAINS, BenchProfile, class_groups

__all__ = ["Bench"]


class Bench:
    """One run's shared state: ``p`` (the profile), ``out``, ``bb`` (the backbone), ``clf`` (the judge),
    ``protected`` (the 4,000 digits FIDs are measured against) and ``labels`` (the class-balanced labels of a
    table-1 cell). Stores live under ``out/stores``, samples under ``out/samples``."""

    def __init__(self, profile: BenchProfile, out: Path, backbone: Backbone, classifier: DigitClassifier,
                 progress: bool):
        self.p, self.out, self.bb, self.clf, self.progress = profile, out, backbone, classifier, progress
        self.protected = public_protected()[1]
        self.scorer = FIDScorer(classifier, self.protected.images)
        self.labels = np.repeat(np.arange(10), profile.n // 10)

    def cfg(self, steps: int, conditional: bool = True) -> CompartmentConfig:
        return CompartmentConfig(steps=max(1, steps), n_prompts=self.p.n_prompts, conditional=conditional,
                                 seed=self.p.seed)

    def store(self, name: str) -> Store:
        path = self.out / "stores" / name
        return Store.open(path) if (path / "registry.sqlite").exists() else Store.create(path)

    def sample(self, st: Store, sources: list[str], name: str, *, weighting: str = "ito",
               labels: np.ndarray | None = None, n: int | None = None, priors: list[float] | None = None,
               threshold: float = 0.0, class_priors: bool = True, unconditional: str = "mixture") -> dict:
        """Generate from stored ``sources`` (:func:`cdm.operations.generate_from_store`; every method on the
        ancestral solver, so methods differ only in their weights), save ``samples/<name>.npz``, return FID /
        seconds / evaluations (and ``_trajectory``, the weights, for a composition)."""
        gen = ops.generate_from_store(st, self.bb, sources, labels=labels, n=n, weighting=weighting, solver="ddpm",
                                      steps=self.p.sample_steps, guidance=self.p.guidance, seed=self.p.seed + 1,
                                      compose_seed=self.p.seed, bf16=self.p.bf16, priors=priors, threshold=threshold,
                                      class_priors=class_priors, unconditional=unconditional)
        images = gen.images
        write_samples(self.out / "samples", name, images, gen.labels,
                      nrow=max(1, len(images) // 10) if labels is not None else 20)
        res = {"fid": round(self.scorer(images), 3), "seconds": round(gen.seconds, 1),
               "evals": gen.evals if gen.evals is not None else len(images) * self.p.sample_steps}
        if gen.weights is not None:
            res["_trajectory"] = gen.weights  # (steps, n, sources)
        return res

    def stratified_store(self, k: int) -> tuple[Store, list[str], dict]:
        """The store of the K-way split with its compartments trained (resumes)."""
        st = self.store(f"k{k}")
        have = {r["cid"] for r in st.compartments()}
        names, seconds = [], {}
        for j, src in enumerate(split_stratified(self.protected, k)):
            name = f"s{j}"
            names.append(name)
            if name not in have:
                t0 = time.perf_counter()
                ops.add_source(st, self.bb, src, name=name, cfg=self.cfg(self.p.budget // k), progress=self.progress)
                seconds[name] = round(time.perf_counter() - t0, 1)
        return st, names, seconds

    def class_group_store(self, k: int) -> tuple[Store, list[str], dict]:
        """The store of the K-way class-group split (the classes divided among K sources, :func:`class_groups`),
        one compartment per group with the fair budget ``budget // k`` (resumes)."""
        st = self.store(f"classes{k}")
        have = {r["cid"] for r in st.compartments()}
        names, seconds = [], {}
        for j, src in enumerate(split_by_classes(self.protected, class_groups(k))):
            name = f"g{j}"
            names.append(name)
            if name not in have:
                t0 = time.perf_counter()
                ops.add_source(st, self.bb, src, name=name, cfg=self.cfg(self.p.budget // k), progress=self.progress)
                seconds[name] = round(time.perf_counter() - t0, 1)
        return st, names, seconds

    def two_domain_store(self, conditional: bool = False) -> Store:
        """Digits 0-4 and 5-9 as two compartments: unconditional (the two-domain part's weightings score the
        sources' unconditional rows) or class-conditional (attribution's class mixtures); separate stores."""
        st = self.store("two-domain-classes" if conditional else "two-domain")
        have = {r["cid"] for r in st.compartments()}
        for name, spec in DOMAINS.items():
            if name not in have:
                ops.add_source(st, self.bb, load_source(spec), name=name,
                               cfg=self.cfg(self.p.two_domain_steps, conditional=conditional), progress=self.progress)
        return st
