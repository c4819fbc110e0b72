"""Compartment capacity at the fair budget: deep prompts (today's default) vs prompts + parallel FFN adapters vs
prompts + LoRA on attention / MLP (issue 20, item 2).

On the domain-gap backbone ``shipped:backbone-glyphs`` (pretrained on rendered glyphs only, so compartments have the
protected MNIST digits to learn), each option trains one class-conditional compartment on each of the 8 stratified
splits of the 4,000 protected digits (``cdm.data.split_stratified``, as ``cdm bench``'s table 1), ``budget // 8``
steps each: together the paragon's ``budget`` at the same batch size (the fair division). Reported per option:

- ``heldout_loss``: the mean over the 8 compartments of the denoising loss on each one's validation rows (the 10% of
  its split with the smallest sample hashes, never trained on), at the step validation kept, with the training
  loop's fixed draws (8 (t, noise) draws per row, seeded): every option is scored on the same rows and noise.
- ``ratio8``: FID of the 8 compartments composed with the ``naive`` weighting (lambda_i(y) = source i's share of
  class y) over the paragon's FID, both from the same class-balanced labels, initial noise, ancestral (DDPM)
  sampler and steps, scored with the shipped digit classifier's features against the 4,000 protected digits. On
  stratified splits every source has the same distribution, so the exact posterior weight of source i is its prior
  lambda_i: the naive weighting *is* the exact composition here (Prop. 3.1), with no weighting error in the ratio.
  The paragon is one prompts-only compartment (today's default) trained on all 4,000 digits with ``budget`` steps;
  it is shared by every option, so the ratios compare the options' composed FIDs directly.

Ranks are chosen by a short measurement: one compartment (split 0) per candidate rank, the lowest held-out loss
wins (split 0's compartment at that rank is then reused). Trained compartments are cached (safetensors, keyed by
config, data and backbone), so a rerun resumes and the paragon is trained once.

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python benchmarks/capacity.py --out benchmarks/results/capacity
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from cdm.backbone import Backbone
from cdm.compartments import Compartment, CompartmentConfig
from cdm.composition import CompartmentBank, ComposedDenoiser
from cdm.composition.weighting import NaiveWeighting
from cdm.data import public_protected, split_stratified
from cdm.evaluation import DigitClassifier, FIDScorer, classify
from cdm.generation import generate
from cdm.io import atomic_write_bytes, atomic_write_json, load_state_dict, save_state_dict
from cdm.provenance import git_commit, machine_info
from cdm.shipped import shipped
from cdm.training.compartment import train_compartment
from cdm.viz import write_samples

OPTIONS = ("prompts", "prompts+adapters", "prompts+lora")
RANK_FIELD = {"prompts+adapters": "adapter_rank", "prompts+lora": "lora_rank"}
K = 8


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Run:
    def __init__(self, args):
        self.args = args
        self.bb = Backbone.from_pretrained(shipped("backbone-glyphs")).freeze()
        self.protected = public_protected()[1]
        self.splits = split_stratified(self.protected, K)
        self.scorer = FIDScorer(DigitClassifier.from_pretrained(shipped("classifier")), self.protected.images)
        self.labels = np.repeat(np.arange(10), args.n // 10)
        self.cache = Path(args.cache)
        self.cache.mkdir(parents=True, exist_ok=True)
        self.seconds: dict[str, float] = {}

    def cfg(self, option: str, rank: int = 0, steps: int | None = None, **kw) -> CompartmentConfig:
        a = self.args
        extra = {RANK_FIELD[option]: rank} if option in RANK_FIELD else {}
        kw = {"validate_every": a.validate_every, **extra, **kw}
        return CompartmentConfig(steps=steps or a.budget // K, batch_size=a.batch_size, n_prompts=a.n_prompts,
                                 seed=a.seed, **kw)

    def train(self, src, cfg: CompartmentConfig) -> tuple[Compartment, dict]:
        """Train (or load the cached) compartment; returns it and its record (validation, wall seconds)."""
        key = hashlib.sha256(json.dumps([cfg.to_dict(), src.content_hash, self.bb.hash], sort_keys=True)
                             .encode()).hexdigest()[:16]
        weights, record = self.cache / f"{key}.safetensors", self.cache / f"{key}.json"
        comp = Compartment.for_backbone(self.bb, cfg)
        if weights.exists() and record.exists():
            comp.load_tensors(load_state_dict(weights), origin=str(weights))
            return comp.eval().requires_grad_(False), json.loads(record.read_text())
        trained, rec = train_compartment(self.bb, src, cfg, progress=False)
        rec = rec.to_dict()
        save_state_dict(weights, trained.tensors())
        atomic_write_json(record, {k: rec[k] for k in ("source", "config", "wall_seconds", "validation",
                                                        "final_loss", "commit")})
        return trained.eval().requires_grad_(False), rec

    def sample(self, eps, name: str) -> dict:
        """One sample set per noise seed: FID (the mean over seeds, and each) and the judge's accuracy (the share
        read as the asked class)."""
        a, fids, accs, seconds = self.args, [], [], 0.0
        for seed in a.seeds:
            t0 = time.perf_counter()
            images, labels = generate(eps, schedule=self.bb.schedule, codec=self.bb.codec, labels=self.labels,
                                      null_class=self.bb.config.null_class, solver="ddpm", steps=a.sample_steps,
                                      seed=seed, bf16=a.bf16, batch_size=a.n, in_chans=self.bb.config.in_chans)
            seconds += time.perf_counter() - t0
            write_samples(Path(a.out) / "samples", f"{name}-seed{seed}", images, labels,
                          nrow=max(1, len(images) // 10))
            fids.append(round(self.scorer(images), 3))
            accs.append(round(float(np.mean(classify(self.scorer.model, images)[0] == labels)), 3))
        return {"fid": round(float(np.mean(fids)), 3), "fid_by_seed": fids, "accuracy": round(float(np.mean(accs)), 3),
                "seconds": round(seconds, 1)}

    def composed(self, comps: list[Compartment]) -> ComposedDenoiser:
        counts = np.array([[int(np.sum(s.labels == c)) for c in range(len(self.protected.classes))]
                           for s in self.splits])
        return ComposedDenoiser(CompartmentBank(self.bb, comps), NaiveWeighting(),
                                priors=[float(len(s)) for s in self.splits], class_priors=counts, record=False)


def _loss(rec: dict) -> dict:
    v = rec["validation"]
    return {"heldout_loss": v["best_loss"], "start_loss": v["start_loss"], "best_step": v["best_step"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/capacity"))
    ap.add_argument("--cache", type=Path, default=Path("runs/capacity-cache"), help="trained compartments")
    ap.add_argument("--budget", type=int, default=800, help="paragon steps; each of the 8 compartments gets 1/8")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--n-prompts", type=int, default=8)
    ap.add_argument("--validate-every", type=int, default=50, help="compartments (the paragon: start and end)")
    ap.add_argument("--n", type=int, default=100, help="samples per FID (class-balanced, a multiple of 10)")
    ap.add_argument("--sample-steps", type=int, default=20)
    ap.add_argument("--bf16", action="store_true", help="bf16 sampling (5.6x slower than fp32 on a CPU without "
                                                        "bf16 units, measured here)")
    ap.add_argument("--adapter-ranks", default="4,16")
    ap.add_argument("--lora-ranks", default="2,4,8")
    ap.add_argument("--seed", type=int, default=0, help="training seed")
    ap.add_argument("--seeds", default="1", help="sampling noise seeds, comma-separated (FIDs averaged; 1: the "
                                                 "bench's)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    if args.n % 10:
        raise SystemExit("--n must be a multiple of 10")
    args.seeds = [int(v) for v in args.seeds.split(",")]
    torch.set_num_threads(args.threads)
    t_start, cpu_start = time.perf_counter(), time.process_time()
    run = Run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ranks = {"prompts": [0], "prompts+adapters": [int(r) for r in args.adapter_ranks.split(",")],
             "prompts+lora": [int(r) for r in args.lora_ranks.split(",")]}
    profile = {"backbone": "shipped:backbone-glyphs", "judge": "shipped:classifier", "splits": K,
               "budget": args.budget, "steps_per_compartment": args.budget // K, "batch_size": args.batch_size,
               "n_prompts": args.n_prompts, "lr": CompartmentConfig().lr, "validate_every": args.validate_every,
               "paragon_validate_every": args.budget, "n": args.n, "sample_steps": args.sample_steps,
               "solver": "ddpm", "sample_seeds": args.seeds, "bf16": args.bf16,
               "weighting": "naive (exact on stratified splits)", "threads": args.threads, "seed": args.seed,
               "candidate_ranks": ranks}
    results: dict = {"capacity": {}, "rank_selection": {}, "paragon": None, "profile": profile}

    def save(partial: bool) -> None:
        results["meta"] = {"command": "python " + shlex.join(sys.argv), "commit": git_commit(),
                           "machine": machine_info(), "wall_seconds": round(time.perf_counter() - t_start, 1),
                           "cpu_seconds": round(time.process_time() - cpu_start, 1),
                           "load_average": [round(v, 2) for v in os.getloadavg()],
                           "date": time.strftime("%Y-%m-%d %H:%M"), "partial": partial, "out": str(out)}
        atomic_write_json(out / "results.json", results)
        atomic_write_bytes(out / "README.md", readme(results).encode())

    # 1. ranks: one compartment (split 0) per candidate rank, lowest held-out loss wins
    chosen = {"prompts": 0}
    for option in ("prompts+adapters", "prompts+lora"):
        sel = {}
        for r in ranks[option]:
            comp, rec = run.train(run.splits[0], run.cfg(option, r))
            sel[str(r)] = {**_loss(rec), "train_seconds": rec["wall_seconds"], "n_parameters": comp.n_parameters}
            log(f"rank selection {option} r={r}: held-out {sel[str(r)]['heldout_loss']} "
                f"({rec['wall_seconds']} s)")
        chosen[option] = min(ranks[option], key=lambda r: sel[str(r)]["heldout_loss"])
        results["rank_selection"][option] = {"split": 0, "by_rank": sel, "chosen": chosen[option]}
        save(partial=True)

    def option_part(option: str) -> None:
        comps, recs = [], []
        for j, src in enumerate(run.splits):
            comp, rec = run.train(src, run.cfg(option, chosen[option]))
            comps.append(comp)
            recs.append(rec)
            log(f"{option} s{j}: held-out {rec['validation']['best_loss']} at step {rec['validation']['best_step']}"
                f" ({rec['wall_seconds']} s)")
        res = run.sample(run.composed(comps), f"k8-{option}")
        losses = [_loss(r) for r in recs]
        results["capacity"][option] = {
            "heldout_loss": round(float(np.mean([v["heldout_loss"] for v in losses])), 6),
            "ratio8": None, "fid8": res["fid"], "fid8_by_seed": res["fid_by_seed"], "accuracy": res["accuracy"],
            "rank": chosen[option] or None,
            "n_parameters": comps[0].n_parameters, "backbone_heldout_loss": round(float(np.mean(
                [v["start_loss"] for v in losses])), 6),
            "heldout_loss_per_split": [v["heldout_loss"] for v in losses],
            "best_steps": [v["best_step"] for v in losses],
            "train_seconds": round(sum(r["wall_seconds"] for r in recs), 1), "sample_seconds": res["seconds"]}
        log(f"{option}: FID8 {res['fid']} ({res['seconds']} s sampling)")
        ratios()
        save(partial=True)

    def ratios() -> None:
        if results["paragon"] is not None:
            for v in results["capacity"].values():
                v["ratio8"] = round(v["fid8"] / results["paragon"]["fid"], 4)
                para = results["paragon"]["fid_by_seed"]
                v["ratio8_by_seed"] = [round(f / g, 4) for f, g in zip(v["fid8_by_seed"], para, strict=True)]

    option_part("prompts")
    # 2. the paragon: prompts only, all protected digits, the whole budget (validated at its start and end)
    para, rec = run.train(run.protected, run.cfg("prompts", steps=args.budget, validate_every=args.budget))
    res = run.sample(para.denoiser(run.bb), "paragon")
    results["paragon"] = {**res, **_loss(rec), "steps": args.budget, "train_seconds": rec["wall_seconds"],
                          "n_parameters": para.n_parameters}
    log(f"paragon: FID {res['fid']}, held-out {rec['validation']['best_loss']}")
    ratios()
    save(partial=True)
    for option in ("prompts+adapters", "prompts+lora"):
        option_part(option)
    cap = results["capacity"]
    results["best"] = {"by_ratio8": min(cap, key=lambda o: cap[o]["ratio8"]),
                       "by_heldout_loss": min(cap, key=lambda o: cap[o]["heldout_loss"]), "default_today": "prompts"}
    save(partial=False)
    log(json.dumps({o: {k: v[k] for k in ("heldout_loss", "ratio8", "fid8", "rank")} for o, v in cap.items()}))


def readme(r: dict) -> str:
    p, m = r["profile"], r["meta"]
    lines = [
        "# Compartment capacity at the fair budget (issue 20, item 2)", "",
        "Prompts (today's default) vs prompts + parallel FFN adapters vs prompts + LoRA (attention qkv / proj and "
        "MLP fc1 / fc2), 8 stratified compartments of the 4,000 protected digits on `shipped:backbone-glyphs`, "
        f"{p['steps_per_compartment']} steps each at batch {p['batch_size']} (the paragon: {p['budget']} steps). "
        "See the docstring of `benchmarks/capacity.py` for the definitions.", "",
        f"    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 {m['command']}", "",
        f"Commit {m['commit']}, {m['machine']['cpus']} CPUs ({m['machine']['torch_threads']} torch thread), torch "
        f"{m['machine']['torch']}, {m['date']}; wall {m['wall_seconds']:.0f} s, CPU {m['cpu_seconds']:.0f} s (the "
        f"machine was shared: load average {m['load_average'][2]} over 15 min at the end)"
        + (" (partial: still running or stopped)" if m["partial"] else "") + ".", "",
        "| option | rank | learned numbers | held-out loss (mean of 8) | FID, 8 composed (per seed) | ratio8 "
        "(per seed) | judge accuracy | train s (8; wall, shared machine) |", "|---|---|---|---|---|---|---|---|"]
    for o, v in r["capacity"].items():
        per = ", ".join(map(str, v["fid8_by_seed"]))
        ratio = "-" if v["ratio8"] is None else f"{v['ratio8']} ({', '.join(map(str, v['ratio8_by_seed']))})"
        lines.append(f"| {o} | {v['rank'] or '-'} | {v['n_parameters']:,} | {v['heldout_loss']:.5f} | {v['fid8']} "
                     f"({per}) | {ratio} | {v['accuracy']} | {v['train_seconds']} |")
    if r["paragon"]:
        q = r["paragon"]
        lines += ["", f"Paragon (prompts, all 4,000 digits, {q['steps']} steps): FID {q['fid']} (per seed "
                  f"{', '.join(map(str, q['fid_by_seed']))}), judge accuracy {q['accuracy']}, held-out loss "
                  f"{q['heldout_loss']} on its own validation rows. The backbone's held-out loss on the 8 splits' "
                  "validation rows (step 0): "
                  + ", ".join(f"{v['backbone_heldout_loss']}" for v in list(r["capacity"].values())[:1]) + "."]
    if r["rank_selection"]:
        lines += ["", "Rank selection (split 0, held-out loss):", ""]
        for o, s in r["rank_selection"].items():
            lines.append(f"- {o}: " + ", ".join(f"r={k}: {v['heldout_loss']} ({v['train_seconds']} s)"
                                                 for k, v in s["by_rank"].items()) + f"; chosen r={s['chosen']}")
    lines += ["", "Profile: " + ", ".join(f"{k} {v}" for k, v in p.items() if k != "candidate_ranks") + ".", "",
              f"FIDs from {p['n']} samples are biased upward and noisy at this size; every cell uses the same labels "
              "and noise (common random numbers), so the comparison between options is tighter than the absolute "
              "values. Samples: `samples/*.npz` and `.png`.", ""]
    if "best" in r:
        lines += [f"Best by ratio8: **{r['best']['by_ratio8']}**; by held-out loss: **{r['best']['by_heldout_loss']}**"
                  " (today's default: prompts).", ""]
    notes = Path(r["meta"]["out"]) / "notes.md"
    if notes.exists():  # the reading of the numbers, written by hand
        lines += [notes.read_text()]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
