"""The benchmark's parts, one function each: ``part(bench, ...) -> {key: result}`` (see :mod:`cdm.benchmark`)."""

from __future__ import annotations

import shutil
import time
from dataclasses import replace

import numpy as np
import torch

from .. import operations as ops
from ..composition.registry import REGISTRY
from ..evaluation import classify
from ..evaluation.metrics import FeatureExtractor
from ..store import Store
from ..viz import write_samples
from .bench import Bench
from .plots import plot_continual, plot_credit, plot_two_domain
from .profiles import DOMAINS, METHODS, class_groups, methods

__all__ = ["CLASS_PRIOR", "PARTS", "attribution", "continual", "cost", "dp", "forget", "memorization", "paragon",
           "table1", "table1_classes", "two_domain", "unconditional"]

PARTS = ("paragon", "table1", "table1_classes", "two_domain", "cost", "unconditional", "continual", "forget",
         "memorization", "dp", "attribution")
CLASS_PRIOR = "class_prior"  # the table's column for lambda_i(y): every weighting reduces to it on class groups


def paragon(bench: Bench) -> dict:
    st = bench.store("paragon")
    t0 = time.perf_counter()
    if not st.compartments():
        ops.add_source(st, bench.bb, bench.protected, name="protected", cfg=bench.cfg(bench.p.budget),
                       progress=bench.progress)
    row = st.compartment("protected")
    res = bench.sample(st, ["protected"], "paragon", labels=bench.labels)
    st.close()
    return {"paragon": {**res, "train_seconds": row["manifest"]["wall_seconds"], "steps": bench.p.budget,
                        "wall_seconds": round(time.perf_counter() - t0, 1)}}


def _train_heads(bench: Bench, st: Store, names: list[str], methods) -> dict:
    """Train (resuming) the heads each learned method needs; returns ``{"<heads>_seconds": s}``."""
    seconds = {}
    for heads in dict.fromkeys(REGISTRY[m].heads for m in methods if REGISTRY[m].heads):
        t0 = time.perf_counter()
        ops.train_heads(st, bench.bb, names, heads, only_missing=True, steps=bench.p.head_steps, seed=bench.p.seed,
                        progress=bench.progress)
        seconds[f"{heads}_seconds"] = round(time.perf_counter() - t0, 1)
    return seconds


def table1(bench: Bench, paragon: dict) -> dict:
    rows, detail = {}, {}
    for k in bench.p.splits:
        st, names, train_s = bench.stratified_store(k)
        cells = {"paragon": paragon["fid"]}
        info = {"compartment_steps": bench.p.budget // k, "train_seconds": train_s,
                **_train_heads(bench, st, names, methods(bench.p))}
        for method in methods(bench.p):
            res = bench.sample(st, names, f"table1-k{k}-{method}", weighting=method, labels=bench.labels)
            res.pop("_trajectory", None)
            cells[method] = res["fid"]
            info[method] = res
            print(f"table1 K={k} {method}: FID {res['fid']} ({res['seconds']} s)", flush=True)
        st.close()
        rows[str(k)], detail[str(k)] = cells, info
    return {"table1": rows, "table1_detail": detail}


def table1_classes(bench: Bench, paragon: dict) -> dict:
    """Table 1 on class-group splits (the classes divided among K sources, the paper's setting). Every weighting
    runs with the sources' data shares as priors and no class priors, so the posterior it computes from x_t is
    all that routes a class to the compartment that holds it; ``naive`` is then the paper's naive average, which
    mixes compartments that never saw the class. ``class_prior`` is cdm's default, lambda_i(y) from the sources'
    class counts: on disjoint groups it leaves one compartment per class, so every weighting gives these images."""
    rows, detail = {}, {}
    for k in bench.p.splits:
        st, names, train_s = bench.class_group_store(k)
        cells = {"paragon": paragon["fid"]}
        info = {"groups": class_groups(k), "compartment_steps": bench.p.budget // k, "train_seconds": train_s,
                **_train_heads(bench, st, names, methods(bench.p))}
        runs = [(m, m, False) for m in methods(bench.p)] + [(CLASS_PRIOR, "naive", True)]
        for col, method, priors in runs:
            res = bench.sample(st, names, f"table1-classes{k}-{col}", weighting=method, labels=bench.labels,
                               class_priors=priors)
            res.pop("_trajectory", None)
            cells[col] = res["fid"]
            info[col] = res
            print(f"table1 classes K={k} {col}: FID {res['fid']} ({res['seconds']} s)", flush=True)
        st.close()
        rows[str(k)], detail[str(k)] = cells, info
    return {"table1_classes": rows, "table1_classes_detail": detail}


def two_domain(bench: Bench) -> dict:
    st = bench.two_domain_store()
    names = list(DOMAINS)
    weightings = [m for m in METHODS if m != "single"]  # single has no posterior to read a domain from
    _train_heads(bench, st, names, weightings)
    out, paths = {}, {}
    for method in weightings:
        res = bench.sample(st, names, f"two-domain-{method}", weighting=method, priors=[1.0, 1.0],
                           n=bench.p.two_domain_n)
        w = res.pop("_trajectory")
        images = np.load(bench.out / "samples" / f"two-domain-{method}.npz")["images"]
        pred, prob, _ = classify(bench.clf, images)
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
    plot_two_domain(paths, bench.out / "two_domain_weights.png", bench.p.sample_steps)
    return {"two_domain": out}


def cost(bench: Bench, table1_detail: dict | None, classes_detail: dict) -> dict:
    """Evaluations, seconds and FID of one compartment, the dense K-way router and sparse gating (router weights
    below a threshold stop being evaluated for that sample): on stratified splits (nothing to prune: the
    posterior is lambda) and on class groups without class priors (the router must find the owner itself);
    ``prior{K}_classes``: class priors, which leave one compartment per class before the first step. Without
    ``table1_detail`` (the stratified table not run) only the class-group rows."""
    k = max(bench.p.splits)
    pick = lambda r: {x: r[x] for x in ("seconds", "evals", "fid")}  # noqa: E731
    out = {"single": pick((table1_detail or classes_detail)[str(k)]["single"])}
    settings = [(bench.stratified_store, table1_detail, "", bench.p.threshold, True)] if table1_detail else []
    settings.append((bench.class_group_store, classes_detail, "_classes", bench.p.class_threshold, False))
    for store, detail, key, threshold, priors in settings:
        st, names, _ = store(k)
        sparse = bench.sample(st, names, f"cost-sparse{k}{key}-router", weighting="router", labels=bench.labels,
                              threshold=threshold, class_priors=priors)
        sparse.pop("_trajectory", None)
        st.close()
        out[f"dense{k}{key}"] = pick(detail[str(k)]["router"])
        out[f"sparse{k}{key}"] = {**pick(sparse), "threshold": threshold}
    out[f"prior{k}_classes"] = pick(classes_detail[str(k)][CLASS_PRIOR])
    return {"cost": out}


def unconditional(bench: Bench) -> dict:
    """Unconditional samples from the K_max class-group composition (Itô weights), scored by the share the judge
    reads confidently (max-prob >= 0.8): each image's class drawn from the sources' class mixture
    (``generate_from_store``'s default) vs the compartments' null-class prompt row. Also the FID of each."""
    k = max(bench.p.splits)
    st, names, _ = bench.class_group_store(k)
    out = {}
    for mode in ("mixture", "null"):
        res = bench.sample(st, names, f"unconditional-classes{k}-{mode}", weighting="ito", n=bench.p.n,
                           unconditional=mode)
        res.pop("_trajectory", None)
        images = np.load(bench.out / "samples" / f"unconditional-classes{k}-{mode}.npz")["images"]
        _, prob, _ = classify(bench.clf, images)
        out[mode] = {"confident": round(float((prob >= 0.8).mean()), 4), **res}
        print(f"unconditional {mode}: {out[mode]['confident']:.1%} confident, FID {res['fid']}", flush=True)
    st.close()
    return {"unconditional_confident": out["mixture"]["confident"],
            "unconditional_detail": {"sources": k, "n": bench.p.n, **out}}


def continual(bench: Bench) -> dict:
    k = max(bench.p.splits)
    st, names, _ = bench.stratified_store(k)
    labels = np.repeat(np.arange(10), bench.p.continual_n // 10)
    steps = [("add", names[:j]) for j in range(1, k + 1)] + [("drop", names[j:]) for j in range(1, k)]
    out = []
    for op, active in steps:
        res = bench.sample(st, active, f"continual-{op}-{'-'.join(active)}", weighting="ito", labels=labels)
        out.append({"op": op, "sources": active, "n_sources": len(active), "fid": res["fid"],
                    "seconds": res["seconds"]})
        print(f"continual {op} {len(active)}: FID {res['fid']}", flush=True)
    st.close()
    base = out[0]["fid"]
    for r in out:
        r["fid_relative_to_one"] = round(r["fid"] / base, 4)
    plot_continual(out, bench.out / "continual.png")
    return {"continual": out}


def forget(bench: Bench, paragon_seconds: float) -> dict:
    k = max(bench.p.splits)
    src = bench.out / "stores" / f"k{k}"
    work = bench.out / "stores" / f"k{k}-forget"  # a copy: the table's store stays whole for reruns
    bench.stratified_store(k)[0].close()
    if work.exists():
        shutil.rmtree(work)
    shutil.copytree(src, work)
    with Store.open(work) as st:
        first = ops.source_data(st, "s0").sample_hashes[0]
        sample = ops.forget_samples(st, bench.bb, "s0", [first], reason="benchmark", progress=False)
        source = ops.forget_source(st, f"s{k - 1}", reason="benchmark")
    shutil.rmtree(work)
    return {"forget": {"source_seconds": round(source.seconds, 4), "sample_seconds": round(sample.seconds, 2),
                       "paragon_seconds": paragon_seconds,
                       "source_ratio": source.seconds / paragon_seconds,
                       "sample_ratio": round(sample.seconds / paragon_seconds, 4)}}


def memorization(bench: Bench) -> dict:
    k = max(bench.p.splits)
    train = bench.protected.images
    feats = FeatureExtractor(bench.clf)
    spaces = {"pixel": lambda im: bench.bb.codec.encode(im).flatten(1).double(),
              "feature": lambda im: torch.cat([feats(torch.from_numpy(np.array(im[i:i + 500])))
                                               for i in range(0, len(im), 500)])}
    out = {}
    for space, embed in spaces.items():
        ref = embed(train)
        d = torch.cdist(ref, ref)
        d.fill_diagonal_(float("inf"))
        threshold = float(np.percentile(d.min(1).values.numpy(), 5))
        for method in ("paragon", *(f"table1-k{k}-{m}" for m in methods(bench.p))):
            images = np.load(bench.out / "samples" / f"{method}.npz")["images"]
            nn_d = torch.cdist(embed(images), ref).min(1).values.numpy()
            key = method.removeprefix(f"table1-k{k}-")
            out.setdefault(key, {})[space] = round(float((nn_d < threshold).mean()), 4)
        out.setdefault("_thresholds", {})[space] = round(threshold, 4)
    shares = {m: v["pixel"] for m, v in out.items() if not m.startswith("_")}
    return {"memorization": shares, "memorization_detail": out}


def dp(bench: Bench) -> dict:
    """Unconditional compartments on all protected digits: DP-SGD at each target epsilon and one without, each
    added to a store as a user would (`cdm add --dp-epsilon E`)."""
    from ..privacy import DPConfig

    cfg = replace(bench.cfg(bench.p.dp_steps, conditional=False), validation=0.0,
                  warmup=max(1, min(50, bench.p.dp_steps // 4)))
    out = {}
    st = bench.store("dp")
    for key in [*(f"{e:g}" for e in bench.p.dp_epsilons), "inf"]:
        t0 = time.perf_counter()
        name = f"eps-{key}"
        if name not in {r["cid"] for r in st.compartments()}:
            ops.add_source(st, bench.bb, bench.protected, name=name, cfg=cfg, progress=bench.progress,
                           dp=None if key == "inf" else DPConfig(epsilon=float(key)))
        dp_entry = st.compartment(name)["manifest"]["dp"]
        res = bench.sample(st, [name], f"dp-eps{key}", n=bench.p.two_domain_n)
        out[key] = {"epsilon": None if dp_entry is None else dp_entry["epsilon"], "fid": res["fid"],
                    "train_seconds": round(time.perf_counter() - t0 - res["seconds"], 1), "dp": dp_entry}
        print(f"dp eps={key}: achieved {out[key]['epsilon']}, FID {res['fid']}", flush=True)
    st.close()
    return {"dp": out}


def attribution(bench: Bench) -> dict:
    """Likelihood credit along the probability-flow ODE for unconditional samples: two class-conditional
    compartments of different domains (digits 0-4 vs 5-9) and the 2-way stratified split (one domain). Each
    source's density is the mixture of its classes weighted by its own class counts (``ClassMixtureBank``):
    a compartment's unconditional prompt row stays close to the public backbone, which draws every digit
    (a 0-4 row drew 5-9 digits in 19% of its confidently read samples), so credits on rows could not name the
    domain more often than that."""
    from ..attribution import attribute, normalised_entropy

    settings = {"two_domain": (bench.two_domain_store(conditional=True), list(DOMAINS)),
                "same_domain": bench.stratified_store(min(bench.p.splits))[:2]}
    m = bench.bb.codec.model_size
    noise = torch.randn((bench.p.attribution_n, bench.bb.config.in_chans, m, m),
                        generator=torch.Generator().manual_seed(bench.p.seed + 5))
    res = {}
    for key, (st, names) in settings.items():
        with st:
            bank = ops.class_mixture_bank(st, bench.bb, names)
        parts = [attribute(bank, noise[s:s + 50], schedule=bench.bb.schedule, priors=bank.priors(),
                           steps=bench.p.sample_steps, probes=2, seed=s, x0_range=bench.bb.codec.x0_range)
                 for s in range(0, len(noise), 50)]
        credit = np.concatenate([p["credit"] for p in parts])
        path = np.concatenate([p["weight_path"] for p in parts])
        images = bench.bb.codec.decode(torch.as_tensor(np.concatenate([p["x0"] for p in parts])))
        write_samples(bench.out / "samples", f"attribution-{key}", images, None, nrow=20)
        res[key] = (credit, path, images)
    credit, path, images = res["two_domain"]
    pred, prob, _ = classify(bench.clf, images)
    confident = prob >= 0.8
    top = np.clip(credit, 0, None).argmax(1)
    domain = (pred >= 5).astype(int)
    plot_credit(credit, res["same_domain"][0], domain, confident, bench.out / "credit.png")

    def share(pick: np.ndarray) -> float | None:
        return round(float((pick[confident] == domain[confident]).mean()), 4) if confident.any() else None

    return {"attribution": {
        "two_domain_top1": share(top),
        "two_domain_confident": int(confident.sum()),
        "two_domain_weight_path_top1": share(path.argmax(1)),
        "same_domain_entropy": round(float(normalised_entropy(res["same_domain"][0]).mean()), 4),
        "two_domain_entropy": round(float(normalised_entropy(credit).mean()), 4),
        "density": "class mixture (each source's classes weighted by its own class counts)"}}
