"""Credit attribution for two disjoint domains with longer-trained unconditional compartments.

The quick benchmark's two-domain compartments get 200 steps; this trains digits 0-4 and 5-9 for ``--steps``
each (one process per domain, so they can run side by side), then attributes ``--n`` unconditional samples
along the probability-flow ODE (likelihood credit, 2 Hutchinson probes, ode-tracked weights, lambda = 1/2) and
reports the share of confidently read samples whose top-credit source is the classifier's domain.

``--conditional`` trains class-conditional compartments instead (the paper's Figure 5 setting: shards of
different domains with their own classes, CUB-200 vs Cars there). Samples stay unconditional: each source's
density is then the mixture of its classes, ``p_i(x) = sum_y pi_i(y) p_i(x | y)`` with ``pi_i`` its own class
frequencies (:class:`cdm.composition.ClassMixtureBank`), and the posterior is tracked over (source, class)
components and summed per source.

``purity`` samples each compartment alone (its unconditional row, or its class mixture for class-conditional
ones, along the same ODE) and reports the share of confident samples in its own domain: how well a compartment
keeps to its source bounds how often the credit can name the classifier's domain.

    python benchmarks/attribution_domains.py train --domain low  --steps 1000 --out benchmarks/results/attribution
    python benchmarks/attribution_domains.py train --domain high --steps 1000 --out benchmarks/results/attribution
    python benchmarks/attribution_domains.py attribute --n 100 --out benchmarks/results/attribution

``--store`` attributes with the two compartments of an existing store instead (e.g. the full benchmark's
``stores/two-domain``), so more samples can be scored without retraining.
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
from cdm.composition import ClassMixtureBank, CompartmentBank
from cdm.data import load_source
from cdm.evaluation import DigitClassifier, classify
from cdm.io import atomic_write_json
from cdm.provenance import git_commit, machine_info
from cdm.store import Store
from cdm.viz import write_samples

WEIGHTS = Path(__file__).resolve().parents[1] / "weights"
DOMAINS = {"low": "mnist/protected/classes[0-4|5-9]-0", "high": "mnist/protected/classes[0-4|5-9]-1"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["train", "attribute", "purity"])
    ap.add_argument("--domain", choices=list(DOMAINS))
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--ode-steps", type=int, default=25)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/attribution"))
    ap.add_argument("--backbone", type=Path, default=WEIGHTS / "backbone")
    ap.add_argument("--prompts", type=int, default=8, help="prompts per block")
    ap.add_argument("--conditional", action="store_true", help="class-conditional compartments, labelled samples")
    ap.add_argument("--store", type=Path, default=None,
                    help="attribute: a store holding both domains' compartments, named low and high (e.g. a "
                    "cdm bench run's stores/two-domain) instead of OUT/store-low and OUT/store-high")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    bb = Backbone.from_pretrained(args.backbone)
    t0 = time.perf_counter()
    if args.what == "train":
        with Store.create(args.out / f"store-{args.domain}") as st:
            if not st.compartments():
                ops.add_source(st, bb, load_source(DOMAINS[args.domain]), name=args.domain,
                               cfg=CompartmentConfig(steps=args.steps, conditional=args.conditional, seed=0,
                                                     n_prompts=args.prompts),
                               progress=False)
        return
    comps, counts = [], []
    for name in DOMAINS:
        with Store.open(args.store or args.out / f"store-{name}") as st:
            comps.append(ops.load_compartment(st, bb, name))
            steps = st.compartment(name)["manifest"]["config"]["steps"]
            c = ops.class_counts(st, [name], comps[-1:])
            counts.append(None if c is None else c[0])
    args.out.mkdir(parents=True, exist_ok=True)
    if any(c.config.conditional for c in comps) != args.conditional:
        raise SystemExit("--conditional must match how the stored compartments were trained")
    if args.conditional and any(c is None for c in counts):
        raise SystemExit("class-conditional compartments need their sources' labels in the store")
    noise = torch.randn((args.n, 1, 14, 14), generator=torch.Generator().manual_seed(5))
    clf = DigitClassifier.from_pretrained(WEIGHTS / "classifier")

    def bank_for(members: list[int]):
        bank = CompartmentBank(bb, [comps[i] for i in members])
        if not args.conditional:
            return bank, [1.0] * len(members)
        mix = ClassMixtureBank(bank, np.stack([counts[i] for i in members]))
        return mix, mix.priors()

    def run(members: list[int]) -> tuple[dict, np.ndarray]:
        bank, priors = bank_for(members)
        parts = [attribute(bank, noise[s:s + 50], schedule=bb.schedule, priors=priors, steps=args.ode_steps,
                           probes=2, seed=s) for s in range(0, args.n, 50)]
        out = {k: np.concatenate([p[k] for p in parts]) for k in ("credit", "weight_path", "x0")}
        return out, bb.codec.decode(torch.as_tensor(out["x0"]))

    density = "class mixture" if args.conditional else "unconditional prompt row"
    if args.what == "purity":
        res = {"density": density, "compartment_steps": steps, "n": args.n, "ode_steps": args.ode_steps}
        for k, name in enumerate(DOMAINS):
            _, images = run([k])
            write_samples(args.out, f"purity-{name}", images, None, nrow=20)
            pred, prob, _ = classify(clf, images)
            conf = prob >= 0.8
            own = (pred >= 5) == (name == "high")
            res[name] = {"own_domain_confident": round(float(own[conf].mean()), 4), "confident": int(conf.sum()),
                         "own_domain_all": round(float(own.mean()), 4),
                         "confident_digits": np.bincount(pred[conf], minlength=10).tolist()}
            print(name, res[name], flush=True)
        res["meta"] = {"command": "python " + shlex.join(sys.argv), "commit": git_commit(), "machine": machine_info(),
                       "wall_seconds": round(time.perf_counter() - t0, 1), "date": time.strftime("%Y-%m-%d")}
        atomic_write_json(args.out / "purity.json", res)
        return
    out, images = run([0, 1])
    credit, path = out["credit"], out["weight_path"]
    write_samples(args.out, "samples", images, None, nrow=20)
    pred, prob, _ = classify(clf, images)
    conf, domain = prob >= 0.8, (pred >= 5).astype(int)
    top = np.clip(credit, 0, None).argmax(1)
    res = {"two_domain_top1": round(float((top[conf] == domain[conf]).mean()), 4), "confident": int(conf.sum()),
           "n": args.n, "top1_all_samples": round(float((top == domain).mean()), 4),
           "weight_path_top1": round(float((path.argmax(1)[conf] == domain[conf]).mean()), 4),
           # confident samples whose top credit is the other domain: the classifier's digit and the credit
           "mismatches": [{"digit": int(pred[i]), "prob": round(float(prob[i]), 3),
                           "credit_low": round(float(credit[i, 0]), 3)}
                          for i in np.flatnonzero(conf & (top != domain))],
           "two_domain_entropy": round(float(normalised_entropy(credit).mean()), 4),
           "conditional": args.conditional, "density": density, "compartment_steps": steps,
           "prompts": comps[0].config.n_prompts, "ode_steps": args.ode_steps,
           "backbone": bb.hash,
           "meta": {"command": "python " + shlex.join(sys.argv), "commit": git_commit(), "machine": machine_info(),
                    "wall_seconds": round(time.perf_counter() - t0, 1), "date": time.strftime("%Y-%m-%d")}}
    atomic_write_json(args.out / "results.json", res)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
