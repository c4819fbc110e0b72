"""The shipped backbone's samples, scored by the shipped classifier (the foundation's reference figures).

1,000 class-conditional samples (100 per digit), DDIM 50 steps, guidance 2: judge accuracy against the
requested digit, mean max-probability relative to real held-out digits, and FID (classifier features) against
the 4,000 protected digits. Also the sampling wall time in float32 and under bf16 autocast, and DPM-Solver++.

    python benchmarks/backbone.py --out benchmarks/results/backbone
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from cdm.backbone import Backbone
from cdm.data import public_protected
from cdm.evaluation import DigitClassifier, score_samples
from cdm.generation import sample_backbone
from cdm.io import atomic_write_json
from cdm.provenance import git_commit, machine_info
from cdm.viz import write_samples

WEIGHTS = Path(__file__).resolve().parents[1] / "weights"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/backbone"))
    ap.add_argument("--per-class", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--backbone", type=Path, default=WEIGHTS / "backbone")
    ap.add_argument("--runs", default="all", help="comma-separated run names, or all")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    bb = Backbone.from_pretrained(args.backbone)
    judge_net = DigitClassifier.from_pretrained(WEIGHTS / "classifier")
    _, protected = public_protected()
    results = {}
    runs = [("ddim50_cfg2", dict(solver="ddim", steps=50, guidance=2.0)),
            ("ddim50_cfg2_bf16", dict(solver="ddim", steps=50, guidance=2.0, bf16=True)),
            ("dpmpp2m25_cfg2", dict(solver="dpmpp2m", steps=25, guidance=2.0)),
            ("ddim50_cfg1", dict(solver="ddim", steps=50, guidance=1.0))]
    if args.runs != "all":
        runs = [r for r in runs if r[0] in args.runs.split(",")]
    for name, kw in runs:
        t0 = time.perf_counter()
        images, labels = sample_backbone(bb, per_class=args.per_class, seed=0, **kw)
        seconds = time.perf_counter() - t0
        write_samples(args.out / "samples", name, images, labels, nrow=args.per_class)
        results[name] = {**score_samples(images, labels, judge_net, protected), "seconds": round(seconds, 1), **kw}
        print(name, json.dumps(results[name]), flush=True)
    results["meta"] = {"command": "python " + shlex.join(sys.argv), "commit": git_commit(), "machine": machine_info(),
                       "backbone": str(args.backbone),
                       "backbone_hash": bb.hash, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    atomic_write_json(args.out / "results.json", results)


if __name__ == "__main__":
    main()
