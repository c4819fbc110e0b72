"""Differential privacy and credit attribution on the embedded data (issue 6; the seed paper's Fig. 5/6 analogs).

dp: unconditional compartments on the protected digits (all 4,000), trained with DP-SGD at epsilon 3 and 8
(delta = min(1/N, 1e-5) = 1e-5, clip 1, Poisson sampling, RDP accountant) and without DP, same steps, same
expected batch, same lr schedule. FID of --n unconditional DDIM samples against the protected digits with the
shipped classifier's features; the epsilon the accountant reports for what ran.

attribution: unconditional compartments on (a) digits 0-4 vs 5-9 of the protected data (the composition
benchmark's two-domain store is reused when present; trained here otherwise) and (b) the two halves of a
stratified split of the protected data (same training config). --n samples each along the probability-flow
ODE (cdm.attribution.attribute, ode-tracked weights, lambda = 1/2 each): for (a), among samples the shipped
classifier reads confidently (max-prob >= 0.8), the share whose top-credit source is the classifier's domain;
for (b), the mean normalised entropy of the credits. Plus the Fig. 5 analog plot.

    python benchmarks/privacy.py all --out benchmarks/results/privacy
    python benchmarks/privacy.py dp            # or one part; parts merge into results.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from cdm import operations as ops
from cdm.attribution import attribute, normalised_entropy
from cdm.backbone import Backbone
from cdm.compartments import CompartmentConfig
from cdm.composition import CompartmentBank
from cdm.data import load_source
from cdm.evaluation import DigitClassifier, FIDScorer, classify
from cdm.generation import generate
from cdm.io import atomic_write_json
from cdm.privacy import DPConfig, train_compartment_dp
from cdm.provenance import git_commit, machine_info
from cdm.store import Store
from cdm.training.compartment import train_compartment
from cdm.viz import write_samples

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = REPO / "weights"
TWO_DOMAIN = {"low": "mnist/protected/classes[0-4|5-9]-0", "high": "mnist/protected/classes[0-4|5-9]-1"}
SAME_DOMAIN = {"half0": "mnist/protected/strat2-0", "half1": "mnist/protected/strat2-1"}
COMPOSITION_STORE = REPO / "benchmarks/results/composition/two-domain-store"


def dp_part(args, bb: Backbone, judge_net: DigitClassifier) -> dict:
    source = load_source("mnist/protected")
    scorer = FIDScorer(judge_net, source.images)
    cfg = CompartmentConfig(steps=args.dp_steps, batch_size=args.dp_batch, conditional=False, seed=0,
                            warmup=min(50, args.dp_steps // 4))
    out = {}
    for key in args.eps:
        t0 = time.perf_counter()
        if key == "inf":
            comp, rec = train_compartment(bb, source, cfg, progress=False)
            eps_achieved = None
        else:
            dp = DPConfig(epsilon=float(key), augmult=args.augmult, max_grad_norm=args.clip)
            comp, rec = train_compartment_dp(bb, source, cfg, dp, progress=False)
            eps_achieved = rec.dp["epsilon"]
        train_s = time.perf_counter() - t0
        images, _ = generate(comp.denoiser(bb), schedule=bb.schedule, codec=bb.codec, n=args.n, solver="ddim",
                             steps=args.sample_steps, seed=3)
        write_samples(args.out / "samples", f"dp-eps{key}", images, None, nrow=20)
        _, prob, _ = classify(judge_net, images)
        out[key] = {"epsilon": eps_achieved, "fid": round(scorer(images), 3),
                    "confident": round(float((prob >= 0.8).mean()), 4),
                    "final_loss": rec.final_loss, "train_seconds": round(train_s, 1), "dp": rec.dp}
        print("dp", key, json.dumps({k: v for k, v in out[key].items() if k != "dp"}), flush=True)
    return {"dp": out, "dp_setup": {
        "source": "mnist/protected", "n": len(source), "compartment": cfg.to_dict(), "augmult": args.augmult,
        "clip": args.clip, "fid_samples": args.n, "fid_reference": f"mnist/protected ({len(source)} digits)",
        "sampler": f"ddim x{args.sample_steps}, unconditional"}}


def _store_with(path: Path, specs: dict, bb: Backbone, steps: int) -> Path:
    with Store.create(path) as st:
        have = {r["cid"] for r in st.compartments()}
        cfg = CompartmentConfig(steps=steps, conditional=False, seed=0)
        for name, spec in specs.items():
            if name not in have:
                ops.add_source(st, bb, load_source(spec), name=name, cfg=cfg, progress=False)
    return path


def _attribute_setting(store_dir: Path, names: list[str], bb: Backbone, args) -> dict:
    with Store.open(store_dir) as st:
        comps = [ops.load_compartment(st, bb, n) for n in names]
    bank = CompartmentBank(bb, comps)
    m = bb.codec.model_size
    noise = torch.randn((args.n, 1, m, m), generator=torch.Generator().manual_seed(5))
    parts = []
    for s in range(0, args.n, args.batch):
        parts.append(attribute(bank, noise[s:s + args.batch], schedule=bb.schedule, priors=[1.0] * len(names),
                               steps=args.sample_steps, probes=args.probes, seed=s))
    cat = {k: np.concatenate([p[k] for p in parts], axis=1 if k == "weights" else 0)
           for k in ("x0", "credit", "credit_se", "L", "loglik_change", "weight_path", "weights")}
    cat["images"] = bb.codec.decode(torch.as_tensor(cat["x0"]))
    return cat


def attribution_part(args, bb: Backbone, judge_net: DigitClassifier) -> dict:
    two_store = COMPOSITION_STORE if (COMPOSITION_STORE / "compartments" / "high").exists() and not args.fresh \
        else _store_with(args.out / "two-domain-store", TWO_DOMAIN, bb, args.attr_steps)
    same_store = _store_with(args.out / "same-domain-store", SAME_DOMAIN, bb, args.attr_steps)
    t0 = time.perf_counter()
    two = _attribute_setting(two_store, list(TWO_DOMAIN), bb, args)
    t_two = time.perf_counter() - t0
    same = _attribute_setting(same_store, list(SAME_DOMAIN), bb, args)
    write_samples(args.out / "samples", "attribution-two-domain", two["images"], None, nrow=20)
    write_samples(args.out / "samples", "attribution-same-domain", same["images"], None, nrow=20)
    pred, prob, _ = classify(judge_net, two["images"])
    confident = prob >= 0.8
    domain = (pred >= 5).astype(int)
    top = np.clip(two["credit"], 0, None).argmax(1)
    path_top = two["weight_path"].argmax(1)
    h_two, h_same = normalised_entropy(two["credit"]), normalised_entropy(same["credit"])
    hp_two, hp_same = normalised_entropy(two["weight_path"]), normalised_entropy(same["weight_path"])
    res = {
        "two_domain_top1": round(float((top[confident] == domain[confident]).mean()), 4) if confident.any() else None,
        "same_domain_entropy": round(float(h_same.mean()), 4),
        "two_domain_entropy": round(float(h_two.mean()), 4),
        "two_domain_confident": int(confident.sum()),
        "two_domain_top1_all_samples": round(float((top == domain).mean()), 4),
        "two_domain_weight_path_top1": round(float((path_top[confident] == domain[confident]).mean()), 4)
        if confident.any() else None,
        "weight_path_entropy": {"two_domain": round(float(hp_two.mean()), 4),
                                "same_domain": round(float(hp_same.mean()), 4)},
        "views_agree": {"two_domain": round(float((top == path_top).mean()), 4),
                        "same_domain": round(float((np.clip(same["credit"], 0, None).argmax(1)
                                                    == same["weight_path"].argmax(1)).mean()), 4)},
        "credit_outside_0_1": {k: round(float(((r["credit"] < 0) | (r["credit"] > 1)).any(1).mean()), 4)
                               for k, r in (("two_domain", two), ("same_domain", same))},
        "credit_se_median": {"two_domain": float(np.median(two["credit_se"])),
                             "same_domain": float(np.median(same["credit_se"]))},
        "loglik_change_mean_nats": {"two_domain": round(float(two["loglik_change"].mean()), 2),
                                    "same_domain": round(float(same["loglik_change"].mean()), 2)},
        "setup": {"samples": args.n, "ode_steps": args.sample_steps, "probes": args.probes, "priors": [0.5, 0.5],
                  "weights": "ode (tracked along the path)", "confident": "classifier max-prob >= 0.8",
                  "two_domain_store": str(two_store.relative_to(REPO) if two_store.is_relative_to(REPO) else two_store),
                  "same_domain_sources": SAME_DOMAIN, "two_domain_sources": TWO_DOMAIN,
                  "seconds_per_setting": round(t_two, 1)},
    }
    print("attribution", json.dumps({k: v for k, v in res.items() if k != "setup"}), flush=True)
    _plot(two, same, domain, confident, args.out / "credit.png", args.sample_steps)
    return {"attribution": res}


def _plot(two: dict, same: dict, domain: np.ndarray, confident: np.ndarray, path: Path, steps: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(9, 6.4))
    x = np.arange(two["weights"].shape[0])
    for k, label in enumerate(["read as 0-4", "read as 5-9"]):
        sel = confident & (domain == k)
        if sel.any():
            axes[0, 0].plot(x, two["weights"][:, sel, 0].mean(1), label=f"w(0-4), confident samples {label}")
    axes[0, 0].set_title("different domains (0-4 | 5-9): weights")
    axes[0, 1].plot(x, same["weights"][:, :, 0], color="C0", alpha=0.08)
    axes[0, 1].plot(x, same["weights"][:, :, 0].mean(1), color="k", label="mean w(half 0)")
    axes[0, 1].set_title("same domain (stratified halves): weights")
    for ax in axes[0]:
        ax.set_xlabel(f"ODE step (of {steps})")
        ax.set_ylim(-0.02, 1.02)
        ax.legend(fontsize=7)
    bins = np.linspace(-0.25, 1.25, 31)
    for k, label in enumerate(["read as 0-4", "read as 5-9"]):
        sel = confident & (domain == k)
        axes[1, 0].hist(two["credit"][sel, 0], bins=bins, alpha=0.6, label=f"confident, {label}")
    axes[1, 0].hist(two["credit"][~confident, 0], bins=bins, alpha=0.3, color="grey", label="not confident")
    axes[1, 0].set_xlabel("credit of the 0-4 source")
    axes[1, 1].hist(same["credit"][:, 0], bins=bins, alpha=0.7, color="C2")
    axes[1, 1].set_xlabel("credit of half 0")
    axes[1, 0].legend(fontsize=7)
    for ax in axes[1]:
        ax.set_ylabel("samples")
    fig.suptitle("Credit attribution (likelihood decomposition along the probability-flow ODE)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", choices=["all", "dp", "attribution"])
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results/privacy")
    ap.add_argument("--eps", default="3,8,inf", help="comma-separated epsilons; inf = no DP")
    ap.add_argument("--dp-steps", type=int, default=150)
    ap.add_argument("--dp-batch", type=int, default=128, help="expected (Poisson) batch size")
    ap.add_argument("--augmult", type=int, default=1)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--attr-steps", type=int, default=300, help="training steps of the attribution compartments")
    ap.add_argument("--fresh", action="store_true", help="train the two-domain compartments here, not reuse them")
    ap.add_argument("--n", type=int, default=200, help="samples per setting")
    ap.add_argument("--batch", type=int, default=50, help="samples per attribution batch")
    ap.add_argument("--probes", type=int, default=2, help="Hutchinson probes per ODE step")
    ap.add_argument("--sample-steps", type=int, default=25)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--backbone", type=Path, default=WEIGHTS / "backbone")
    args = ap.parse_args()
    args.eps = [e for e in args.eps.split(",") if e]
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    bb = Backbone.from_pretrained(args.backbone)
    judge_net = DigitClassifier.from_pretrained(WEIGHTS / "classifier")
    t0 = time.perf_counter()
    parts = ["dp", "attribution"] if args.part == "all" else [args.part]
    res = {}
    for p in parts:
        res.update({"dp": dp_part, "attribution": attribution_part}[p](args, bb, judge_net))
    meta = {"command": "python " + shlex.join(sys.argv), "commit": git_commit(), "machine": machine_info(),
            "wall_seconds": round(time.perf_counter() - t0, 1), "date": time.strftime("%Y-%m-%d")}
    path = args.out / "results.json"
    import fcntl

    with open(args.out / ".results.lock", "w") as lock:  # parts may run in parallel; merge under a lock
        fcntl.flock(lock, fcntl.LOCK_EX)
        old = json.loads(path.read_text()) if path.exists() else {}
        old.update(res)
        old.setdefault("meta", {}).update({p: meta for p in parts})
        atomic_write_json(path, old)


if __name__ == "__main__":
    main()
