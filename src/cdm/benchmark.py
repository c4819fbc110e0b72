"""``cdm bench``: the seed paper's evaluation on the embedded data, with plots and a report.

Parts (each cached under ``OUT/parts/<part>.json`` with its stores under ``OUT/stores``, so an interrupted or
chunked run resumes where it stopped; ``--parts`` picks some):

- ``paragon``: one compartment on all 4,000 protected digits, ``budget`` optimiser steps (the "no split"
  reference). Sampled once; the same paragon row appears at every split.
- ``table1``: for K in ``splits``: the protected digits in K stratified sources, one class-conditional
  compartment each with ``budget // K`` steps (so all K compartments together get the paragon's budget, at the
  same batch size: the fair division), a router and one isolated head per source (``head_steps`` each). Then
  class-balanced samples composed with ``router``, ``isolated``, ``ito``, ``naive``, and ``single`` (one
  compartment, source 0), scored by FID against the 4,000 protected digits (features of the shipped
  classifier; same N and reference in every cell).
- ``two_domain``: digits 0-4 vs 5-9 as two unconditional compartments; composed vs naive grids, the share of
  samples the classifier reads confidently (max-prob >= 0.8) and the domain split among those, w_i(t).
- ``cost``: 1 vs K_max compartments, dense vs sparse gating (router, threshold), evaluations, seconds, FID.
- ``continual``: the K_max sources added one at a time, then dropped one at a time (Itô weights: training-free,
  so nothing but the compartments changes); FID relative to one source.
- ``forget``: on the K_max store: forget one sample (exact retrain of one compartment) and one source, as
  ratios to the paragon's training time.
- ``memorization``: per method, the share of samples whose nearest training digit (L2 on the model's 14x14
  pixels, and on classifier features) is closer than the 5th percentile of train-to-train nearest-neighbour
  distances.

All sampling uses the ancestral DDPM sampler (the Itô weighting needs a stochastic one) with the same steps,
seed and guidance for every method. Every evaluated sample set is saved as ``OUT/samples/<name>.npz``.
"""

from __future__ import annotations

import io as _io
import json
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from . import operations as ops
from .backbone import Backbone
from .compartments import CompartmentConfig
from .data import load_source, public_protected, split_stratified
from .demo import write_samples
from .evaluation import DigitClassifier, FIDScorer, classify
from .evaluation.metrics import FeatureExtractor
from .generation import generate
from .io import atomic_write_bytes, atomic_write_json
from .store import Store

__all__ = ["BenchProfile", "PROFILES", "PARTS", "run_bench"]


@dataclass(frozen=True)
class BenchProfile:
    splits: tuple[int, ...] = (2, 4, 8)  # stratified splits of the protected digits (table 1 rows)
    budget: int = 1600  # paragon optimiser steps; each of K compartments gets budget // K (batch 64 throughout)
    n_prompts: int = 8  # prompts per block (compartments and paragon alike)
    head_steps: int = 300  # steps for the router and for each isolated head
    n: int = 500  # samples per evaluated cell, class-balanced (a multiple of 10)
    sample_steps: int = 50  # ancestral DDPM steps, every method
    guidance: float = 1.0  # classifier-free guidance scale (1: none; the composed distribution as is)
    bf16: bool = True  # bf16 autocast for sampling (2.3x faster here at equal FID, see benchmarks/backbone.py)
    two_domain_steps: int = 600  # steps per unconditional two-domain compartment
    two_domain_n: int = 200  # unconditional samples per two-domain weighting
    continual_n: int = 200  # samples per continual / drop step
    threshold: float = 0.01  # sparse gating: compartments below this weight are skipped
    dp_steps: int = 300  # steps of each DP / non-DP unconditional compartment on all protected digits
    dp_epsilons: tuple[float, ...] = (3.0, 8.0)  # DP-SGD targets (plus one compartment without DP)
    attribution_n: int = 100  # unconditional samples attributed per setting
    seed: int = 0


PROFILES: dict[str, BenchProfile] = {
    # seconds: keeps the code path alive in CI (numbers mean nothing)
    "toy": BenchProfile(splits=(2,), budget=4, head_steps=2, n=20, sample_steps=3, two_domain_steps=2,
                        two_domain_n=10, continual_n=10, bf16=False, dp_steps=3, attribution_n=4),
    # what a new user runs: under 25 minutes on 2 cores (fewer steps and samples everywhere; numbers indicative)
    "quick": BenchProfile(budget=320, head_steps=50, n=100, sample_steps=20, two_domain_steps=150, two_domain_n=100,
                          continual_n=50, dp_steps=40, attribution_n=40),
    # the README's numbers
    "full": BenchProfile(),
}

CLEARLY_WORSE = 1.05  # "naive clearly worse": its FID at least this multiple of the router's (a margin, not a test)
PARTS = ("paragon", "table1", "two_domain", "cost", "continual", "forget", "memorization", "dp", "attribution")
METHODS = ("router", "isolated", "ito", "naive", "single")
DOMAINS = {"low": "mnist/protected/classes[0-4|5-9]-0", "high": "mnist/protected/classes[0-4|5-9]-1"}


class _Bench:
    def __init__(self, profile: BenchProfile, out: Path, backbone: Backbone, classifier: DigitClassifier,
                 progress: bool):
        self.p, self.out, self.bb, self.clf, self.progress = profile, out, backbone, classifier, progress
        self.protected = public_protected()[1]
        self.scorer = FIDScorer(classifier, self.protected.images)
        self.labels = np.repeat(np.arange(10), profile.n // 10)

    # -- helpers -----------------------------------------------------------------------------------------------
    def cfg(self, steps: int, conditional: bool = True) -> CompartmentConfig:
        return CompartmentConfig(steps=max(1, steps), n_prompts=self.p.n_prompts, conditional=conditional,
                                 seed=self.p.seed)

    def store(self, name: str) -> Store:
        path = self.out / "stores" / name
        return Store.open(path) if (path / "registry.sqlite").exists() else Store.create(path)

    def sample(self, eps, name: str, labels: np.ndarray | None = None, n: int | None = None) -> dict:
        """Sample, save ``samples/<name>.npz``, return FID / seconds / evaluations."""
        traj: list = []
        t0 = time.perf_counter()
        images, _ = generate(eps, schedule=self.bb.schedule, codec=self.bb.codec, labels=labels, n=n,
                             null_class=self.bb.config.null_class, guidance=self.p.guidance, solver="ddpm",
                             steps=self.p.sample_steps, seed=self.p.seed + 1, bf16=self.p.bf16, trajectories=traj)
        seconds = time.perf_counter() - t0
        write_samples(self.out / "samples", name, images, labels, nrow=max(1, len(images) // 10) if labels is not None
                      else 20)
        res = {"fid": round(self.scorer(images), 3), "seconds": round(seconds, 1),
               "evals": int(getattr(eps, "evals", len(images) * self.p.sample_steps))}
        if traj:
            res["_trajectory"] = np.concatenate([t.numpy() for t in traj], axis=1)  # (steps, n, sources)
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

    # -- parts -------------------------------------------------------------------------------------------------
    def paragon(self) -> dict:
        st = self.store("paragon")
        t0 = time.perf_counter()
        if not st.compartments():
            ops.add_source(st, self.bb, self.protected, name="protected", cfg=self.cfg(self.p.budget),
                           progress=self.progress)
        row = st.compartment("protected")
        comp = ops.load_compartment(st, self.bb, "protected")
        res = self.sample(comp.denoiser(self.bb), "paragon", labels=self.labels)
        st.close()
        return {"paragon": {**res, "train_seconds": row["manifest"]["wall_seconds"], "steps": self.p.budget,
                            "wall_seconds": round(time.perf_counter() - t0, 1)}}

    def table1(self, paragon: dict) -> dict:
        rows, detail = {}, {}
        for k in self.p.splits:
            st, names, train_s = self.stratified_store(k)
            have = {r["cid"] for r in st.compartments()}
            t0 = time.perf_counter()
            if "router" not in have:
                ops.train_router_op(st, self.bb, names, kind="router", steps=self.p.head_steps, seed=self.p.seed,
                                    progress=self.progress)
            router_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            for n in names:
                if ops.head_cid(n) not in have:
                    ops.train_isolated_op(st, self.bb, n, steps=self.p.head_steps, seed=self.p.seed,
                                          progress=self.progress)
            isolated_s = time.perf_counter() - t0
            cells = {"paragon": paragon["fid"]}
            info = {"compartment_steps": self.p.budget // k, "train_seconds": train_s,
                    "router_seconds": round(router_s, 1), "isolated_seconds": round(isolated_s, 1)}
            for method in METHODS:
                comp = ops.compose(st, self.bb, names, weighting=method, seed=self.p.seed)
                res = self.sample(comp, f"table1-k{k}-{method}", labels=self.labels)
                res.pop("_trajectory", None)
                cells[method] = res["fid"]
                info[method] = res
                print(f"table1 K={k} {method}: FID {res['fid']} ({res['seconds']} s)", flush=True)
            st.close()
            rows[str(k)], detail[str(k)] = cells, info
        return {"table1": rows, "table1_detail": detail}

    def two_domain(self) -> dict:
        st = self.two_domain_store()
        have = {r["cid"] for r in st.compartments()}
        names = list(DOMAINS)
        if "router" not in have:
            ops.train_router_op(st, self.bb, names, kind="router", steps=self.p.head_steps, seed=self.p.seed,
                                progress=self.progress)
        for n in names:
            if ops.head_cid(n) not in have:
                ops.train_isolated_op(st, self.bb, n, steps=self.p.head_steps, seed=self.p.seed, progress=self.progress)
        out, paths = {}, {}
        for method in ("router", "isolated", "ito", "naive"):
            comp = ops.compose(st, self.bb, names, weighting=method, priors=[1.0, 1.0], seed=self.p.seed)
            res = self.sample(comp, f"two-domain-{method}", n=self.p.two_domain_n)
            w = res.pop("_trajectory")
            images = np.load(self.out / "samples" / f"two-domain-{method}.npz")["images"]
            pred, prob, _ = classify(self.clf, images)
            confident = prob >= 0.8
            domain = (pred >= 5).astype(int)
            out[method] = {
                "confident_in_domain": round(float(confident.mean()), 4),
                "domain_fraction": [round(float((domain[confident] == d).mean()), 4) if confident.any() else None
                                    for d in range(2)],
                "weight_domain_agreement": round(float((w[-1].argmax(1)[confident] == domain[confident]).mean()), 4)
                if confident.any() else None,
                "mean_weight_low": [round(float(v), 4) for v in w[:, :, 0].mean(1)],
                **{k: res[k] for k in ("seconds", "evals")}}
            paths[method] = (w, domain)
            print(f"two-domain {method}: confident {out[method]['confident_in_domain']}", flush=True)
        st.close()
        plot_two_domain(paths, self.out / "two_domain_weights.png", self.p.sample_steps)
        return {"two_domain": out}

    def cost(self, table1_detail: dict) -> dict:
        k = max(self.p.splits)
        st, names, _ = self.stratified_store(k)
        comp = ops.compose(st, self.bb, names, weighting="router", threshold=self.p.threshold, seed=self.p.seed)
        sparse = self.sample(comp, f"cost-sparse{k}-router", labels=self.labels)
        sparse.pop("_trajectory", None)
        st.close()
        d = table1_detail[str(k)]
        pick = lambda r: {x: r[x] for x in ("seconds", "evals", "fid")}  # noqa: E731
        return {"cost": {"single": pick(d["single"]), f"dense{k}": pick(d["router"]),
                         f"sparse{k}": {**pick(sparse), "threshold": self.p.threshold}}}

    def continual(self) -> dict:
        k = max(self.p.splits)
        st, names, _ = self.stratified_store(k)
        labels = np.repeat(np.arange(10), self.p.continual_n // 10)
        steps = [("add", names[:j]) for j in range(1, k + 1)] + [("drop", names[j:]) for j in range(1, k)]
        out = []
        for op, active in steps:
            comp = ops.compose(st, self.bb, active, weighting="ito", seed=self.p.seed)
            res = self.sample(comp, f"continual-{op}-{'-'.join(active)}", labels=labels)
            out.append({"op": op, "sources": active, "n_sources": len(active), "fid": res["fid"],
                        "seconds": res["seconds"]})
            print(f"continual {op} {len(active)}: FID {res['fid']}", flush=True)
        st.close()
        base = out[0]["fid"]
        for r in out:
            r["fid_relative_to_one"] = round(r["fid"] / base, 4)
        _plot_continual(out, self.out / "continual.png")
        return {"continual": out}

    def forget(self, paragon_seconds: float) -> dict:
        k = max(self.p.splits)
        src = self.out / "stores" / f"k{k}"
        work = self.out / "stores" / f"k{k}-forget"  # a copy: the table's store stays whole for reruns
        self.stratified_store(k)[0].close()
        if work.exists():
            shutil.rmtree(work)
        shutil.copytree(src, work)
        with Store.open(work) as st:
            first = ops.source_data(st, "s0").sample_hashes[0]
            sample = ops.forget_samples(st, self.bb, "s0", [first], reason="benchmark", progress=False)
            source = ops.forget_source(st, f"s{k - 1}", reason="benchmark")
        shutil.rmtree(work)
        return {"forget": {"source_seconds": round(source["seconds"], 4), "sample_seconds": round(sample["seconds"], 2),
                           "paragon_seconds": paragon_seconds,
                           "source_ratio": source["seconds"] / paragon_seconds,
                           "sample_ratio": round(sample["seconds"] / paragon_seconds, 4)}}

    def memorization(self) -> dict:
        k = max(self.p.splits)
        train = self.protected.images
        feats = FeatureExtractor(self.clf)
        spaces = {"pixel": lambda im: self.bb.codec.encode(im).flatten(1).double(),
                  "feature": lambda im: torch.cat([feats(torch.from_numpy(np.array(im[i:i + 500])))
                                                   for i in range(0, len(im), 500)])}
        out = {}
        for space, embed in spaces.items():
            ref = embed(train)
            d = torch.cdist(ref, ref)
            d.fill_diagonal_(float("inf"))
            threshold = float(np.percentile(d.min(1).values.numpy(), 5))
            for method in ("paragon", *(f"table1-k{k}-{m}" for m in METHODS)):
                images = np.load(self.out / "samples" / f"{method}.npz")["images"]
                nn_d = torch.cdist(embed(images), ref).min(1).values.numpy()
                key = method.removeprefix(f"table1-k{k}-")
                out.setdefault(key, {})[space] = round(float((nn_d < threshold).mean()), 4)
            out.setdefault("_thresholds", {})[space] = round(threshold, 4)
        shares = {m: v["pixel"] for m, v in out.items() if not m.startswith("_")}
        return {"memorization": shares, "memorization_detail": out}


    def dp(self) -> dict:
        """Unconditional compartments on all protected digits: DP-SGD at each target epsilon and one without."""
        from .privacy import DPConfig, train_compartment_dp
        from .training.compartment import train_compartment

        cfg = replace(self.cfg(self.p.dp_steps, conditional=False), validation=0.0,
                      warmup=max(1, min(50, self.p.dp_steps // 4)))
        out = {}
        for key in [*(f"{e:g}" for e in self.p.dp_epsilons), "inf"]:
            t0 = time.perf_counter()
            if key == "inf":
                comp, rec = train_compartment(self.bb, self.protected, cfg, progress=self.progress)
            else:
                comp, rec = train_compartment_dp(self.bb, self.protected, cfg, DPConfig(epsilon=float(key)),
                                                 progress=self.progress)
            res = self.sample(comp.denoiser(self.bb), f"dp-eps{key}", n=self.p.two_domain_n)
            out[key] = {"epsilon": None if rec["dp"] is None else rec["dp"]["epsilon"], "fid": res["fid"],
                        "train_seconds": round(time.perf_counter() - t0 - res["seconds"], 1), "dp": rec["dp"]}
            print(f"dp eps={key}: achieved {out[key]['epsilon']}, FID {res['fid']}", flush=True)
        return {"dp": out}

    def attribution(self) -> dict:
        """Likelihood credit along the probability-flow ODE for unconditional samples: two class-conditional
        compartments of different domains (digits 0-4 vs 5-9) and the 2-way stratified split (one domain). Each
        source's density is the mixture of its classes weighted by its own class counts (``ClassMixtureBank``):
        a compartment's unconditional prompt row stays close to the public backbone, which draws every digit
        (a 0-4 row drew 5-9 digits in 19% of its confidently read samples), so credits on rows could not name the
        domain more often than that."""
        from .attribution import attribute, normalised_entropy

        settings = {"two_domain": (self.two_domain_store(conditional=True), list(DOMAINS)),
                    "same_domain": self.stratified_store(min(self.p.splits))[:2]}
        m = self.bb.codec.model_size
        noise = torch.randn((self.p.attribution_n, 1, m, m), generator=torch.Generator().manual_seed(self.p.seed + 5))
        res = {}
        for key, (st, names) in settings.items():
            with st:
                bank = ops.class_mixture_bank(st, self.bb, names)
            parts = [attribute(bank, noise[s:s + 50], schedule=self.bb.schedule, priors=bank.priors(),
                               steps=self.p.sample_steps, probes=2, seed=s)
                     for s in range(0, len(noise), 50)]
            credit = np.concatenate([p["credit"] for p in parts])
            path = np.concatenate([p["weight_path"] for p in parts])
            images = self.bb.codec.decode(torch.as_tensor(np.concatenate([p["x0"] for p in parts])))
            write_samples(self.out / "samples", f"attribution-{key}", images, None, nrow=20)
            res[key] = (credit, path, images)
        credit, path, images = res["two_domain"]
        pred, prob, _ = classify(self.clf, images)
        confident = prob >= 0.8
        top = np.clip(credit, 0, None).argmax(1)
        domain = (pred >= 5).astype(int)
        _plot_credit(credit, res["same_domain"][0], domain, confident, self.out / "credit.png")

        def share(pick: np.ndarray) -> float | None:
            return round(float((pick[confident] == domain[confident]).mean()), 4) if confident.any() else None

        return {"attribution": {
            "two_domain_top1": share(top),
            "two_domain_confident": int(confident.sum()),
            "two_domain_weight_path_top1": share(path.argmax(1)),
            "same_domain_entropy": round(float(normalised_entropy(res["same_domain"][0]).mean()), 4),
            "two_domain_entropy": round(float(normalised_entropy(credit).mean()), 4),
            "density": "class mixture (each source's classes weighted by its own class counts)"}}

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


def _plot_credit(two: np.ndarray, same: np.ndarray, domain: np.ndarray, confident: np.ndarray, path: Path) -> None:
    """Figure 5 analog: the credit of the first source per sample, different vs same domain."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2), sharey=True)
    bins = np.linspace(-0.25, 1.25, 31)
    for d, label in enumerate(["read as 0-4", "read as 5-9"]):
        sel = confident & (domain == d)
        if sel.any():
            axes[0].hist(two[sel, 0], bins=bins, alpha=0.6, label=label)
    axes[0].set_title("different domains: credit of digits 0-4")
    if confident.any():
        axes[0].legend(fontsize=7)
    axes[1].hist(same[:, 0], bins=bins, alpha=0.8, color="grey")
    axes[1].set_title("one domain (2 stratified halves): credit of half 0")
    for ax in axes:
        ax.set_xlabel("credit")
    axes[0].set_ylabel("samples")
    _save(fig, path)


def plot_two_domain(paths: dict, path: Path, steps: int) -> None:
    """Mean weight of the digits-0-4 compartment over sampling steps, per weighting, for samples the
    classifier reads as 0-4 vs 5-9 (``paths``: name -> (weights (steps, N, 2), domain (N,)))."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(paths), figsize=(3.6 * len(paths), 3.2), sharey=True)
    for ax, (name, (w, domain)) in zip(np.atleast_1d(axes), paths.items(), strict=True):
        for d, label in enumerate(["read as 0-4", "read as 5-9"]):
            if (domain == d).any():
                ax.plot(np.arange(w.shape[0]), w[:, domain == d, 0].mean(1), label=label)
        ax.set_title(name)
        ax.set_xlabel(f"sampling step (of {steps})")
        ax.set_ylim(-0.02, 1.02)
    np.atleast_1d(axes)[0].set_ylabel("mean w(digits 0-4)")
    np.atleast_1d(axes)[0].legend(fontsize=7)
    _save(fig, path)


def _plot_table1(table: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = sorted(table, key=int)
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for method in ("paragon", *METHODS):
        ax.plot([int(k) for k in ks], [table[k][method] for k in ks], marker="o", label=method,
                linestyle="--" if method == "paragon" else "-")
    ax.set_xticks([int(k) for k in ks])
    ax.set_xlabel("number of sources (stratified splits)")
    ax.set_ylabel("FID (classifier features)")
    ax.legend(fontsize=7)
    _save(fig, path)


def _plot_continual(rows: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.4))
    for op, marker in (("add", "o"), ("drop", "s")):
        sel = [r for r in rows if r["op"] == op]
        ax.plot([r["n_sources"] for r in sel], [r["fid_relative_to_one"] for r in sel], marker=marker,
                label="adding sources" if op == "add" else "dropping sources")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xlabel("sources composed (Itô weights)")
    ax.set_ylabel("FID relative to one source")
    ax.legend(fontsize=7)
    _save(fig, path)


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = _io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def run_bench(profile: str | BenchProfile, out: str | Path, *, backbone: str | Path, classifier: str | Path,
              parts: tuple[str, ...] = PARTS, progress: bool = False, meta: dict | None = None,
              device: str = "cpu") -> dict:
    """Run (or resume) the benchmark; returns the merged results, also written to ``out/results.json`` and
    ``out/report.md``. ``device`` runs the backbone's transformer there (``"cuda"``); all else stays on the
    CPU (see ``UViT.forward``)."""
    from .training import git_commit, machine_info

    name = profile if isinstance(profile, str) else "custom"
    if isinstance(profile, str):
        if profile not in PROFILES:
            raise ValueError(f"unknown profile {profile!r}; known: {', '.join(PROFILES)}")
        profile = PROFILES[profile]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise ValueError(f"unknown parts {unknown}; known: {', '.join(PARTS)}")
    if profile.n % 10 or profile.continual_n % 10:
        raise ValueError("n and continual_n must be multiples of 10 (class-balanced samples)")
    out = Path(out)
    (out / "parts").mkdir(parents=True, exist_ok=True)
    prof_file = out / "profile.json"
    current = _jsonable(asdict(profile))
    if prof_file.exists():  # fields added to the profile since that run are fine; changed ones are not
        old = json.loads(prof_file.read_text())
        if any(old[k] != current.get(k) for k in old):
            raise ValueError(f"{out} holds a run with another profile; use another --out or delete it")
    atomic_write_json(prof_file, _jsonable(asdict(profile)))
    bench = _Bench(profile, out, Backbone.from_pretrained(backbone).to(device),
                   DigitClassifier.from_pretrained(classifier), progress)
    done = {p: json.loads((out / "parts" / f"{p}.json").read_text()) for p in PARTS
            if (out / "parts" / f"{p}.json").exists()}

    def need(part: str) -> dict:
        if part not in done:
            t0 = time.perf_counter()
            res = {
                "paragon": lambda: bench.paragon(),
                "table1": lambda: bench.table1(need("paragon")["paragon"]),
                "two_domain": bench.two_domain,
                "cost": lambda: bench.cost(need("table1")["table1_detail"]),
                "continual": bench.continual,
                "forget": lambda: bench.forget(need("paragon")["paragon"]["train_seconds"]),
                "memorization": lambda: (need("table1"), bench.memorization())[1],
                "dp": bench.dp,
                "attribution": bench.attribution,
            }[part]()
            res["_part"] = {"wall_seconds": round(time.perf_counter() - t0, 1), "commit": git_commit(),
                            "machine": machine_info(), "device": device, "command": (meta or {}).get("command"),
                            "date": time.strftime("%Y-%m-%d %H:%M")}
            atomic_write_json(out / "parts" / f"{part}.json", res)
            done[part] = res
        return done[part]

    for part in parts:
        need(part)
    results: dict = {}
    for part in PARTS:
        if part in done:
            results.update({k: v for k, v in done[part].items() if k != "_part"})
    walls = {p: done[p]["_part"]["wall_seconds"] for p in done}
    results["meta"] = {"commit": git_commit(), "machine": machine_info(), "profile": name,
                       "profile_config": _jsonable(asdict(profile)), "wall_seconds": round(sum(walls.values()), 1),
                       "part_seconds": walls, "part_commits": {p: done[p]["_part"]["commit"] for p in done},
                       "part_machines": {p: _where(done[p]["_part"]) for p in done}, "device": device,
                       **(meta or {})}
    if "table1" in results:
        _plot_table1(results["table1"], out / "table1.png")
        results["table1_selection"] = _selection(out, profile)
    atomic_write_json(out / "results.json", results)
    atomic_write_bytes(out / "report.md", report(results).encode())
    return results


def _where(part: dict) -> str:
    """Where a part ran, in words: CPUs, torch, and the GPU when the transformer ran on one."""
    mc, dev = part.get("machine", {}), str(part.get("device", "cpu"))
    gpu = f", transformer on {mc.get('cuda')}" if dev.startswith("cuda") else ""
    return f"{mc.get('cpus')} CPUs ({mc.get('torch_threads')} torch threads){gpu}, torch {mc.get('torch')}"


def _selection(out: Path, profile: BenchProfile) -> dict:
    """Per split: the step each compartment kept (validation; 0 means it is exactly the backbone)."""
    res = {}
    for k in profile.splits:
        path = out / "stores" / f"k{k}"
        if not (path / "registry.sqlite").exists():
            continue
        with Store.open(path) as st:
            steps = {r["cid"]: (st.compartment(r["cid"])["manifest"].get("validation") or {}).get("best_step")
                     for r in st.compartments(kind="compartment")}
        res[str(k)] = {"best_steps": steps, "at_backbone": sum(1 for v in steps.values() if v == 0)}
    return res


def _jsonable(d: dict) -> dict:
    return json.loads(json.dumps(d))


def report(r: dict) -> str:
    """The benchmark's report.md: tables, targets checked against the seed's, plots."""
    m = r["meta"]
    where: dict[str, list[str]] = {}
    for part, machine in m.get("part_machines", {}).items():
        where.setdefault(machine, []).append(part)
    lines = [f"# cdm benchmark ({m['profile']} profile)", "",
             f"Commit `{m['commit']}`, {m['wall_seconds']:.0f} s of parts. Profile: "
             f"`{json.dumps(m['profile_config'])}`.", ""]
    lines += [f"- {machine}: {', '.join(parts)}" for machine, parts in where.items()] + ([""] if where else [])
    if "table1" in r:
        t = r["table1"]
        cols = ("paragon", *METHODS)
        lines += ["## Table 1 analog: FID (lower is better), class-conditional, stratified splits", "",
                  "| sources | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
        for k in sorted(t, key=int):
            lines.append(f"| {k} | " + " | ".join(f"{t[k][c]:.2f}" for c in cols) + " |")
        kmax = max(t, key=int)
        ratio = t[kmax]["router"] / t[kmax]["paragon"]
        naive_worse = t[kmax]["naive"] >= CLEARLY_WORSE * t[kmax]["router"]
        singles = [t[k]["single"] for k in sorted(t, key=int)]
        lines += ["", "Targets from the seed paper:",
                  f"- composed (router) within 10% of the paragon at {kmax} sources: ratio {ratio:.3f} -> "
                  f"{'met' if ratio <= 1.10 else 'MISSED'}",
                  f"- naive clearly worse than composed at {kmax} (by {CLEARLY_WORSE - 1:.0%} or more): naive "
                  f"{t[kmax]['naive']:.2f} vs router {t[kmax]['router']:.2f} -> {'met' if naive_worse else 'MISSED'}",
                  f"- single degrades with more splits: {' -> '.join(f'{s:.2f}' for s in singles)} -> "
                  f"{'met' if all(a < b for a, b in zip(singles, singles[1:], strict=False)) else 'MISSED'}",
                  ""]
        for k, v in sorted(r.get("table1_selection", {}).items(), key=lambda kv: int(kv[0])):
            if v["at_backbone"]:
                lines.append(f"- {k} sources: {v['at_backbone']} of {k} compartments kept step 0 on their "
                             "validation slice, i.e. are exactly the backbone (training only raised their validation "
                             "loss at this budget); composing identical compartments cannot differ from one.")
        lines += ["", "![table 1](table1.png)", ""]
    if "two_domain" in r:
        lines += ["## Figure 1 analog: two disjoint domains (digits 0-4 vs 5-9), unconditional", "",
                  "| weighting | confident share | domain split of confident (0-4, 5-9) | dominant weight = domain |",
                  "|---|---|---|---|"]
        for k, v in r["two_domain"].items():
            lines.append(f"| {k} | {v['confident_in_domain']:.3f} | {v['domain_fraction']} | "
                         f"{v['weight_domain_agreement']} |")
        lines += ["", "![w(t)](two_domain_weights.png)", "",
                  "Grids: `samples/two-domain-router.png` (composed) vs `samples/two-domain-naive.png`.", ""]
    if "cost" in r:
        lines += ["## Cost of composing", "", "| | seconds | denoiser evaluations | FID |", "|---|---|---|---|"]
        for k, v in r["cost"].items():
            lines.append(f"| {k} | {v['seconds']} | {v['evals']:,} | {v['fid']:.2f} |")
        lines.append("")
    if "continual" in r:
        lines += ["## Figure 4 analog: continual learning and forgetting (Itô weights)", "",
                  "| step | sources | FID | relative to one source |", "|---|---|---|---|"]
        for v in r["continual"]:
            lines.append(f"| {v['op']} | {', '.join(v['sources'])} | {v['fid']:.2f} | {v['fid_relative_to_one']:.3f} |")
        lines += ["", "![continual](continual.png)", ""]
    if "forget" in r:
        f = r["forget"]
        lines += ["## Forgetting wall time", "",
                  f"- forget a source: {f['source_seconds']} s ({f['source_ratio']:.2e} of the paragon's "
                  f"{f['paragon_seconds']} s training)",
                  f"- forget a sample (exact retrain of one compartment): {f['sample_seconds']} s "
                  f"({f['sample_ratio']:.3f} of the paragon's training)", ""]
    if "dp" in r:
        lines += ["## Differential privacy (unconditional compartments on all protected digits)", "",
                  "| target epsilon | achieved epsilon | noise multiplier | FID |", "|---|---|---|---|"]
        for k, v in r["dp"].items():
            sigma = v["dp"]["noise_multiplier"] if v.get("dp") else None
            lines.append(f"| {k} | {v['epsilon'] if v['epsilon'] is not None else '-'} | "
                         f"{f'{sigma:.3f}' if sigma is not None else '-'} | {v['fid']:.2f} |")
        lines.append("")
    if "attribution" in r:
        a = r["attribution"]
        lines += ["## Figure 5 analog: credit attribution (likelihood along the probability-flow ODE)", "",
                  f"Each source's density: {a.get('density', 'its unconditional prompt row')}.", "",
                  f"- two domains: the top-credit source is the classifier's domain for {a['two_domain_top1']} of "
                  f"{a['two_domain_confident']} confident samples (target from the issue: 0.95); the largest "
                  f"time-integrated weight for {a.get('two_domain_weight_path_top1', '-')}",
                  f"- mean normalised credit entropy: one domain {a['same_domain_entropy']}, two domains "
                  f"{a['two_domain_entropy']}", "", "![credit](credit.png)", ""]
    if "memorization" in r:
        d = r["memorization_detail"]
        lines += ["## Memorization: share of samples closer to a training digit than the 5th percentile of "
                  "train-to-train nearest neighbours", "", "| method | 14x14 pixels | classifier features |",
                  "|---|---|---|"]
        for k, v in d.items():
            if not k.startswith("_"):
                lines.append(f"| {k} | {v['pixel']:.3f} | {v['feature']:.3f} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def with_overrides(profile: BenchProfile, **kw) -> BenchProfile:
    return replace(profile, **{k: v for k, v in kw.items() if v is not None})
