"""Composition on the embedded data (the seed paper's Fig. 1 analog and the cost of composing).

two-domain: two unconditional compartments, digits 0-4 and digits 5-9 of the protected data. Unconditional
samples composed with each weighting (same ancestral sampler and steps for all): the share the shipped
classifier reads confidently (max-prob >= 0.8), the fraction of those in each domain (vs lambda = 1/2 each),
agreement between the dominant final weight and the classifier's domain, and w_i(t) averaged over samples.

cost: the 8 stratified compartments of benchmarks/compartments.py, class-conditional sampling with Ito
weights: one compartment vs 8 dense vs 8 sparse (threshold 0.01): denoiser evaluations, wall time, FID.

    python benchmarks/composition.py two-domain --out benchmarks/results/composition
    python benchmarks/composition.py cost --out benchmarks/results/composition \
        --store benchmarks/results/compartments/store
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
from cdm.backbone import Backbone
from cdm.benchmark import plot_two_domain
from cdm.compartments import CompartmentConfig
from cdm.data import load_source, public_protected
from cdm.evaluation import DigitClassifier, classify, score_samples
from cdm.generation import generate
from cdm.io import atomic_write_json
from cdm.provenance import git_commit, machine_info
from cdm.store import Store
from cdm.viz import write_samples

WEIGHTS = Path(__file__).resolve().parents[1] / "weights"
DOMAINS = {"low": "mnist/protected/classes[0-4|5-9]-0", "high": "mnist/protected/classes[0-4|5-9]-1"}


def two_domain(args, bb: Backbone, judge_net: DigitClassifier) -> dict:
    store_dir = args.out / "two-domain-store"
    names = list(DOMAINS)
    with Store.create(store_dir) as st:
        have = {r["cid"] for r in st.compartments()}
        cfg = CompartmentConfig(steps=args.steps, conditional=False, seed=0)
        for name, spec in DOMAINS.items():
            if name not in have:
                ops.add_source(st, bb, load_source(spec), name=name, cfg=cfg, progress=False)
        trained = {}
        for kind in args.learned:
            t0 = time.perf_counter()
            if kind == "isolated":
                for name in names:
                    if f"{name}.head" not in have:
                        ops.train_isolated_op(st, bb, name, steps=args.head_steps, seed=0)
            elif kind not in have and {"router": "router", "classifier": "noisy-classifier"}[kind] not in have:
                ops.train_router_op(st, bb, names, kind=kind, steps=args.head_steps, seed=0)
            trained[kind] = round(time.perf_counter() - t0, 1)
        out = {"heads_seconds": trained, "compartment_steps": args.steps}
        plots = {}
        for weighting in ["naive", "ito", *args.learned]:
            comp = ops.compose(st, bb, names, weighting=weighting, priors=[1.0, 1.0])
            traj: list = []
            t0 = time.perf_counter()
            images, _ = generate(comp, schedule=bb.schedule, codec=bb.codec, n=args.n, solver="ddpm",
                                 steps=args.sample_steps, seed=1, trajectories=traj)
            seconds = time.perf_counter() - t0
            write_samples(args.out / "samples", f"two-domain-{weighting}", images, None, nrow=20)
            pred, prob, _ = classify(judge_net, images)
            confident = prob >= 0.8
            domain = (pred >= 5).astype(int)
            w = np.concatenate([t.numpy() for t in traj], axis=1)  # (steps, n, 2)
            dominant = w[-1].argmax(1)
            out[weighting] = {
                "confident_in_domain": round(float(confident.mean()), 4),
                "domain_fraction": [round(float((domain[confident] == k).mean()), 4) for k in range(2)],
                "weight_domain_agreement": round(float((dominant[confident] == domain[confident]).mean()), 4),
                "seconds": round(seconds, 1), "evals": int(comp.evals)}
            plots[weighting] = (w, domain)
            print(weighting, json.dumps(out[weighting]), flush=True)
    plot_two_domain(plots, args.out / "two-domain-weights.png", args.sample_steps)
    return {"two_domain": out}


def cost(args, bb: Backbone, judge_net: DigitClassifier) -> dict:
    _, protected = public_protected()
    labels = np.repeat(np.arange(10), args.n // 10)
    out = {}
    with Store.open(args.store) as st:
        names = [r["cid"] for r in st.compartments(kind="compartment")]
        for name, srcs, thr in [("single", names[:1], 0.0), ("dense8", names, 0.0), ("sparse8", names, args.threshold)]:
            comp = ops.compose(st, bb, srcs, weighting="ito", threshold=thr)
            t0 = time.perf_counter()
            images, _ = generate(comp, schedule=bb.schedule, codec=bb.codec, labels=labels,
                                 null_class=bb.config.null_class,
                                 guidance=2.0, solver="ddpm", steps=args.sample_steps, seed=2, batch_size=len(labels))
            seconds = time.perf_counter() - t0
            write_samples(args.out / "samples", f"cost-{name}", images, labels, nrow=args.n // 10)
            s = score_samples(images, labels, judge_net, protected)
            out[name] = {"sources": len(srcs), "threshold": thr, "seconds": round(seconds, 1), "evals": int(comp.evals),
                         "fid": s["fid"], "accuracy": s["accuracy"]}
            print(name, json.dumps(out[name]), flush=True)
    return {"cost": out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", choices=["two-domain", "cost"])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/composition"))
    ap.add_argument("--store", type=Path, default=Path("benchmarks/results/compartments/store"))
    ap.add_argument("--steps", type=int, default=500, help="training steps per two-domain compartment")
    ap.add_argument("--head-steps", type=int, default=300, help="training steps for router / classifier / heads")
    ap.add_argument("--learned", default="router,isolated,classifier", help="learned weightings to train and test")
    ap.add_argument("--n", type=int, default=200, help="samples per weighting")
    ap.add_argument("--sample-steps", type=int, default=50)
    ap.add_argument("--threshold", type=float, default=0.01)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--backbone", type=Path, default=WEIGHTS / "backbone")
    args = ap.parse_args()
    args.learned = [k for k in args.learned.split(",") if k]
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    bb = Backbone.from_pretrained(args.backbone)
    judge_net = DigitClassifier.from_pretrained(WEIGHTS / "classifier")
    t0 = time.perf_counter()
    res = {"two-domain": two_domain, "cost": cost}[args.part](args, bb, judge_net)
    res["meta"] = {"command": "python " + shlex.join(sys.argv), "commit": git_commit(), "machine": machine_info(),
                   "wall_seconds": round(time.perf_counter() - t0, 1), "date": time.strftime("%Y-%m-%d")}
    atomic_write_json(args.out / f"{args.part}.json", res)


if __name__ == "__main__":
    main()
