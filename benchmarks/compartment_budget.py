"""Is the 8-source gap of the full benchmark undertraining? Give each compartment more steps than the fair budget.

The full profile gives each of K compartments ``budget / K`` steps (200 at K = 8), and on the domain-gap backbone
every one of them was still improving when it stopped. This trains the same 8 stratified compartments with
``--steps`` each (same recipe, seed and validation), a router with the profile's head steps, and samples
``router``, ``naive`` and ``single`` exactly as the full profile's table 1 does (same 500 labels, noise seed,
ancestral sampler, steps, bf16), so the FIDs compare cell by cell with that table and its paragon.

    python benchmarks/compartment_budget.py --steps 600 --backbone weights/backbone-glyphs \
        --paragon benchmarks/results/bench-full-glyphs --out benchmarks/results/compartment-budget-glyphs
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from cdm import operations as ops
from cdm.backbone import Backbone
from cdm.benchmark import PROFILES, Bench, selection, with_overrides
from cdm.evaluation import DigitClassifier
from cdm.io import atomic_write_json
from cdm.provenance import git_commit, machine_info

WEIGHTS = Path(__file__).resolve().parents[1] / "weights"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=600, help="optimiser steps per compartment")
    ap.add_argument("--k", type=int, default=8, help="stratified sources")
    ap.add_argument("--backbone", type=Path, default=WEIGHTS / "backbone-glyphs")
    ap.add_argument("--paragon", type=Path, required=True, help="a full-profile cdm bench results folder")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ref = json.loads((args.paragon / "results.json").read_text())
    full = PROFILES["full"]
    if ref["meta"]["profile"] != "full":
        raise SystemExit(f"{args.paragon}: not a full-profile run")
    profile = with_overrides(full, splits=(args.k,), budget=args.steps * args.k)
    t0 = time.perf_counter()
    bench = Bench(profile, args.out, Backbone.from_pretrained(args.backbone),
                  DigitClassifier.from_pretrained(WEIGHTS / "classifier"), progress=False)
    st, names, train_s = bench.stratified_store(args.k)
    if "router" not in {r["cid"] for r in st.compartments()}:
        ops.train_router_op(st, bench.bb, names, kind="router", steps=profile.head_steps, seed=profile.seed,
                            progress=False)
    cells = {"paragon": ref["table1"][str(args.k)]["paragon"]}
    detail = {}
    for method in ("router", "naive", "single"):
        comp = ops.compose(st, bench.bb, names, weighting=method, seed=profile.seed)
        res = bench.sample(comp, f"k{args.k}-{method}", labels=bench.labels)
        res.pop("_trajectory", None)
        cells[method], detail[method] = res["fid"], res
        print(f"K={args.k}, {args.steps} steps each, {method}: FID {res['fid']}", flush=True)
    st.close()
    best = selection(args.out, profile)[str(args.k)]["best_steps"]
    out = {"k": args.k, "steps_per_compartment": args.steps, "fair_budget_steps": full.budget // args.k,
           "fid": cells, "fair_budget_fid": {m: ref["table1"][str(args.k)][m] for m in ("router", "naive", "single")},
           "router_over_paragon": round(cells["router"] / cells["paragon"], 4), "best_steps": best,
           "train_seconds": train_s, "detail": detail,
           "meta": {"command": "python " + shlex.join(sys.argv), "commit": git_commit(), "machine": machine_info(),
                    "wall_seconds": round(time.perf_counter() - t0, 1), "date": time.strftime("%Y-%m-%d %H:%M")}}
    atomic_write_json(args.out / "results.json", out)
    print(json.dumps({k: out[k] for k in ("fid", "fair_budget_fid", "router_over_paragon", "best_steps")}, indent=1))


if __name__ == "__main__":
    main()
