"""Compartments on the embedded data: the protected MNIST split into 8 stratified sources.

Measures, per compartment: training time, stored size, and the denoising loss on that source's held-out
samples (10% of each source, never trained on) against the frozen backbone without prompts (same t and
noise draws). Then the paragon (same prompt budget, trained on the union of the 8 training parts for 8x the
steps of one compartment: the same total budget), and the wall time of forgetting one sample (exact retrain
of one compartment) and one source (no training), as ratios to the paragon's training time.

Parts can run in separate processes (one CPU thread each) and are merged by ``report``:

    python benchmarks/compartments.py compartments --out benchmarks/results/compartments
    python benchmarks/compartments.py paragon      --out benchmarks/results/compartments
    python benchmarks/compartments.py forget       --out benchmarks/results/compartments
    python benchmarks/compartments.py report       --out benchmarks/results/compartments
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

from cdm.backbone import Backbone
from cdm.compartments import CompartmentConfig
from cdm.data import concat_sources, public_protected, split_stratified
from cdm.io import atomic_write_json
from cdm.operations import add_source, forget_samples, forget_source, load_compartment
from cdm.provenance import git_commit, machine_info
from cdm.store import Store
from cdm.training.compartment import train_compartment
from cdm.training.loss import held_out_loss

K = 8


def parts(held_out: float = 0.1):
    """(train, held-out) for each of the K stratified sources; the held-out 10% is chosen by content hash."""
    _, protected = public_protected()
    out = []
    for src in split_stratified(protected, K):
        order = np.argsort(np.asarray(src.sample_hashes))
        n_held = int(round(held_out * len(src)))
        held, train = np.sort(order[:n_held]), np.sort(order[n_held:])
        out.append((src.subset(train, id=f"{src.id}/train"), src.subset(held, id=f"{src.id}/held-out")))
    return out


def cfg_for(args, steps: int) -> CompartmentConfig:
    return CompartmentConfig(steps=steps, n_prompts=args.prompts, seed=0,
                             **({} if args.lr is None else {"lr": args.lr}))


def run_compartments(args, bb: Backbone) -> dict:
    rows = []
    with Store.create(args.out / "store") as st:
        for j, (train, held) in enumerate(parts()):
            name = f"s{j}"
            t0 = time.perf_counter()
            res = add_source(st, bb, train, name=name, cfg=cfg_for(args, args.steps), progress=False)
            seconds = time.perf_counter() - t0
            comp = load_compartment(st, bb, name)
            x, y = bb.codec.encode(held.images), torch.tensor(held.labels)
            loss_c = held_out_loss(comp.denoiser(bb), x, bb.schedule, y=y, draws=args.draws, seed=j)
            loss_b = held_out_loss(bb.eps, x, bb.schedule, y=y, draws=args.draws, seed=j)
            size = (st.path / "compartments" / name / "prompts.safetensors").stat().st_size
            rows.append({"source": name, "n_train": len(train), "n_held_out": len(held), "seconds": round(seconds, 1),
                         "train_seconds": res.record.wall_seconds, "bytes": size,
                         "held_out_loss": round(loss_c, 6), "backbone_held_out_loss": round(loss_b, 6),
                         "validation": res.record.validation,
                         "weights_sha256": res.compartment.weights_sha256})
            print(json.dumps(rows[-1]), flush=True)
    return {"compartments": rows}


def run_paragon(args, bb: Backbone) -> dict:
    ps = parts()
    union = concat_sources([p[0] for p in ps], id="mnist/protected/strat8-train-union")
    t0 = time.perf_counter()
    comp, rec = train_compartment(bb, union, cfg_for(args, K * args.steps), progress=False)
    seconds = time.perf_counter() - t0
    held = concat_sources([p[1] for p in ps], id="held-out")
    x, y = bb.codec.encode(held.images), torch.tensor(held.labels)
    return {"paragon": {"n_train": len(union), "steps": K * args.steps, "seconds": round(seconds, 1),
                        "held_out_loss": round(held_out_loss(comp.denoiser(bb), x, bb.schedule, y=y,
                                                             draws=args.draws), 6),
                        "backbone_held_out_loss": round(held_out_loss(bb.eps, x, bb.schedule, y=y, draws=args.draws),
                                                        6),
                        "validation": rec.validation}}


def run_forget(args, bb: Backbone) -> dict:
    import shutil

    train0 = parts()[0][0]
    work = args.out / "store-forget"  # a copy: the 8-compartment store stays whole for the composition benchmark
    if work.exists():
        shutil.rmtree(work)
    shutil.copytree(args.out / "store", work)
    with Store.open(work) as st:
        before = {r["cid"]: r["weights_sha256"] for r in st.compartments()}
        sample = forget_samples(st, bb, "s0", [train0.sample_hashes[0]], reason="benchmark", progress=False)
        direct, _ = train_compartment(bb, train0.without([train0.sample_hashes[0]]), cfg_for(args, args.steps),
                                      progress=False)
        from cdm.io import state_dict_sha256

        exact = state_dict_sha256(load_compartment(st, bb, "s0").tensors()) == state_dict_sha256(direct.tensors())
        src = forget_source(st, f"s{K - 1}", reason="benchmark")
        after = {r["cid"]: r["weights_sha256"] for r in st.compartments()}
        untouched = all(after[c] == before[c] for c in after if c != "s0")
    return {"forget": {"sample_seconds": round(sample.seconds, 2), "source_seconds": round(src.seconds, 4),
                       "sample_exact": exact, "others_unchanged": untouched}}


def report(args) -> dict:
    merged = {}
    for part in ("compartments", "paragon", "forget"):
        f = args.out / f"{part}.json"
        if f.exists():
            merged.update(json.loads(f.read_text()))
    if "paragon" in merged and "forget" in merged:
        p = merged["paragon"]["seconds"]
        merged["ratios"] = {"forget_sample_over_paragon": round(merged["forget"]["sample_seconds"] / p, 4),
                            "forget_source_over_paragon": merged["forget"]["source_seconds"] / p}
    if "compartments" in merged:
        rows = merged["compartments"]
        merged["summary"] = {
            "mean_train_seconds": round(float(np.mean([r["train_seconds"] for r in rows])), 1),
            "bytes": rows[0]["bytes"],
            "all_below_backbone": all(r["held_out_loss"] < r["backbone_held_out_loss"] for r in rows),
            "mean_held_out_loss": round(float(np.mean([r["held_out_loss"] for r in rows])), 5),
            "mean_backbone_held_out_loss": round(float(np.mean([r["backbone_held_out_loss"] for r in rows])), 5)}
    return merged


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", choices=["compartments", "paragon", "forget", "report"])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/compartments"))
    ap.add_argument("--steps", type=int, default=500, help="steps per compartment (the paragon gets 8x)")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--lr", type=float, default=None, help="default: CompartmentConfig's")
    ap.add_argument("--draws", type=int, default=32, help="(t, noise) draws per held-out sample")
    ap.add_argument("--backbone", type=Path, default=Path(__file__).resolve().parents[1] / "weights" / "backbone")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.part == "report":
        res = report(args)
        atomic_write_json(args.out / "results.json", res)
        print(json.dumps(res, indent=2))
        return
    bb = Backbone.from_pretrained(args.backbone)
    t0 = time.perf_counter()
    res = {"compartments": run_compartments, "paragon": run_paragon, "forget": run_forget}[args.part](args, bb)
    res[f"meta_{args.part}"] = {"command": "python " + shlex.join(sys.argv), "commit": git_commit(),
                                "machine": machine_info(), "wall_seconds": round(time.perf_counter() - t0, 1),
                                "steps": args.steps, "prompts": args.prompts, "lr": args.lr, "draws": args.draws,
                                "date": time.strftime("%Y-%m-%d")}
    atomic_write_json(args.out / f"{args.part}.json", res)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
