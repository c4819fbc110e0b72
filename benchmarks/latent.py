"""Pixel mode against latent mode on the emoji benchmark, at equal training wall time on this machine.

Both backbones are pretrained from scratch on Noto only (the public artist) with one recipe (``cdm pretrain
--data emoji:noto --data-size 32 --channels 3``, batch 64, cosine lr, EMA), side by side, one thread each, so
their clocks run under the same load:

* pixel: the shipped emoji backbone's architecture (32x32 RGB pooled to 16x16, patch 2: 64 tokens);
* latent: the same U-ViT width and depth on the 8x8x4 latents of ``--autoencoder`` (patch 2: 16 tokens).

Each run's step count is its measured steps/s (a short probe, alone) times ``--minutes``; side by side they ran
at other rates than alone, so the latent run (``latent-budget``) took longer than the pixel run. A third run,
``latent``, is the latent recipe with the step count the latent run achieves in the pixel run's wall time (its
side-by-side steps/s times the pixel run's seconds): that is the equal-wall-time comparison.
Then each backbone draws class-balanced samples of the populated categories
(ancestral DDPM, 50 steps, one seed; the latent one decodes them), scored by the emoji judge: FID against Noto
(judge features), ``artist_acc`` (the share the judge reads as Noto, the artist it was trained on) and category
accuracy. ``autoencoder.psnr``: reconstruction PSNR on every artist (the four protected ones never trained on)
and on the protected digits.

    python benchmarks/latent.py --autoencoder shipped:autoencoder-emoji --minutes 25 --runs runs/latent \
        --out benchmarks/results/latent
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from cdm.autoencoder import Autoencoder
from cdm.autoencoder.train import psnr_report
from cdm.backbone import Backbone
from cdm.benchmark.emoji import PUBLIC, populated_categories
from cdm.data import emoji
from cdm.evaluation import FIDScorer, ImageClassifier, classify, source_probs
from cdm.evaluation.emoji_judge import ARTIST_ORDER
from cdm.io import atomic_write_json
from cdm.operations import generate_from_store
from cdm.provenance import git_commit, machine_info
from cdm.viz import write_samples

RECIPE = ["--data", "emoji:noto", "--data-size", "32", "--channels", "3", "--patch-size", "2", "--no-public-digits",
          "--lr-schedule", "cosine"]


def _args(mode: str, autoencoder: str) -> list[str]:
    return RECIPE + (["--image-size", "16"] if mode == "pixel" else ["--image-size", "8", "--autoencoder", autoencoder])


def _pretrain(out: Path, mode: str, autoencoder: str, steps: int) -> subprocess.Popen:
    cmd = ["cdm", "pretrain", "--out", str(out), "--steps", str(steps), "--threads", "1", *_args(mode, autoencoder)]
    print("$", shlex.join(cmd), flush=True)
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(out.with_suffix(".log"), "w"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--autoencoder", default="shipped:autoencoder-emoji")
    ap.add_argument("--judge", default="shipped:judge-emoji")
    ap.add_argument("--minutes", type=float, default=25.0, help="training wall time of each backbone")
    ap.add_argument("--probe-steps", type=int, default=40)
    ap.add_argument("--per-class", type=int, default=25, help="samples per populated category (8 of them)")
    ap.add_argument("--sample-steps", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2, help="threads for sampling and scoring")
    ap.add_argument("--runs", type=Path, default=Path("runs/latent"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/latent"))
    args = ap.parse_args()
    args.runs.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    modes = ("pixel", "latent")
    final = {m: args.runs / m for m in modes}
    final["latent-budget"] = args.runs / "latent-budget"
    del final["latent"]

    # 1. steps per second of each, alone, one thread; then both for the same wall time, side by side
    side = {"pixel": final["pixel"], "latent": final["latent-budget"]}  # the side-by-side runs by recipe
    rate, todo = {}, [m for m in modes if not (side[m] / "model.safetensors").exists()]
    for m in modes:
        probe = args.runs / f"probe-{m}"
        if not (probe / "training.json").exists():
            subprocess.run(["cdm", "pretrain", "--out", str(probe), "--steps", str(args.probe_steps), "--threads", "1",
                            *_args(m, args.autoencoder)], check=True, stdout=subprocess.DEVNULL)
        rec = json.loads((probe / "training.json").read_text())
        rate[m] = rec["steps_done"] / rec["wall_seconds"]
        print(f"probe {m}: {rate[m]:.3f} steps/s", flush=True)
    procs = [_pretrain(side[m], m, args.autoencoder, int(rate[m] * args.minutes * 60)) for m in todo]
    for p in procs:
        if p.wait() != 0:
            sys.exit(f"pretraining failed: {p.args}")
    # 2. the latent recipe for exactly the pixel run's wall time
    px, lb = (json.loads((final[k] / "training.json").read_text()) for k in ("pixel", "latent-budget"))
    final["latent"] = args.runs / "latent-eqwall"
    if not (final["latent"] / "model.safetensors").exists():
        steps = round(lb["steps_done"] / lb["wall_seconds"] * px["wall_seconds"])
        if _pretrain(final["latent"], "latent", args.autoencoder, steps).wait() != 0:
            sys.exit("pretraining failed: latent-eqwall")

    # 3. sample and judge (run it on an otherwise idle machine: images/s is measured here)
    torch.set_num_threads(args.threads)
    judge = ImageClassifier.from_pretrained(args.judge)
    scorer = FIDScorer(judge, emoji(PUBLIC).images)
    labels = np.repeat(np.asarray(populated_categories()), args.per_class)
    res = {}
    for m in ("pixel", "latent", "latent-budget"):
        bb = Backbone.from_pretrained(final[m])
        rec = json.loads((final[m] / "training.json").read_text())
        t0 = time.perf_counter()
        gen = generate_from_store(None, bb, labels=labels, solver="ddpm", steps=args.sample_steps, seed=1)
        seconds = time.perf_counter() - t0
        write_samples(args.out / "samples", f"backbone-{m}", gen.images, labels, nrow=args.per_class)
        pred, _, _ = classify(judge, gen.images)
        who = source_probs(judge, gen.images).argmax(1)
        c = bb.config
        res[m] = {"train_steps_per_s": round(rec["steps_done"] / rec["wall_seconds"], 3),  # latent: see below
                  "sample_images_per_s": round(len(labels) / seconds, 3),
                  "fid_backbone": round(scorer(gen.images), 3),
                  "artist_acc": round(float(np.mean(who == ARTIST_ORDER.index(PUBLIC))), 4),
                  "category_acc": round(float(np.mean(pred == labels)), 4),
                  "steps": rec["steps_done"], "train_seconds": rec["wall_seconds"],
                  "final_loss": round(rec["final_loss"], 4), "probe_steps_per_s": round(rate[m.split("-")[0]], 3),
                  "model": f"{c.in_chans}x{c.img_size}x{c.img_size}, patch {c.patch_size}, "
                           f"{(c.img_size // c.patch_size) ** 2} tokens, width {c.embed_dim}, depth {c.depth}",
                  "params": sum(p.numel() for p in bb.net.parameters()), "hash": bb.hash,
                  "command": rec["command"]}
        print(m, json.dumps(res[m]), flush=True)
    # steps/s compare between runs that shared the machine: pixel and latent-budget ran side by side; the
    # equal-wall-time latent run ran later, beside other work, so its speed is latent-budget's
    res["latent"]["own_run_steps_per_s"] = res["latent"]["train_steps_per_s"]
    res["latent"]["train_steps_per_s"] = res["latent-budget"]["train_steps_per_s"]
    res["latent_budget"] = res.pop("latent-budget")
    ae = Autoencoder.from_pretrained(args.autoencoder)
    results = {
        "autoencoder": {"psnr": psnr_report(ae), "ref": args.autoencoder, "hash": ae.hash,
                        "params": sum(p.numel() for p in ae.net.parameters()),
                        "factor": ae.factor, "latent_channels": ae.latent_channels,
                        "training": {k: (ae.record or {}).get(k) for k in ("command", "steps_done", "wall_seconds",
                                                                           "data", "psnr_public")}},
        **res,
        "targets": {
            "latent_2x_faster_per_step": res["latent"]["train_steps_per_s"] >= 2 * res["pixel"]["train_steps_per_s"],
            "judge_no_worse": res["latent"]["artist_acc"] >= res["pixel"]["artist_acc"]
            and res["latent"]["category_acc"] >= res["pixel"]["category_acc"]},
        "meta": {"commit": git_commit(), "machine": machine_info(), "minutes": args.minutes, "judge": args.judge,
                 "n_samples": len(labels), "sample_steps": args.sample_steps,
                 "command": "python " + " ".join(shlex.quote(a) for a in sys.argv)},
    }
    atomic_write_json(args.out / "results.json", results)
    print(json.dumps({k: results[k] for k in ("autoencoder", "targets")}, indent=1))


if __name__ == "__main__":
    main()
