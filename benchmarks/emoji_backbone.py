"""Choosing the emoji backbone's resolution and patch size by measurement.

Each candidate is a backbone pretrained on Noto only with the same recipe and steps (``cdm pretrain --data
emoji:noto --data-size 32 --channels 3 --image-size S --patch-size P``), trained side by side on the same machine
with the same threads, so their training speeds compare. Each is scored with the emoji judge on class-balanced
samples of the populated categories (ancestral DDPM, 50 steps, no guidance): FID against Noto (judge features),
category accuracy, and the share the judge reads as Noto.

    python benchmarks/emoji_backbone.py --runs runs/emoji-bb-32-p4 runs/emoji-bb-16-p2 \
        --out benchmarks/results/emoji/backbone-choice.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import numpy as np
import torch

from cdm.backbone import Backbone
from cdm.benchmark.emoji import PUBLIC, populated_categories
from cdm.data import emoji
from cdm.evaluation import FIDScorer, ImageClassifier, classify, source_probs
from cdm.evaluation.emoji_judge import ARTIST_ORDER
from cdm.io import atomic_write_json
from cdm.operations import generate_from_store
from cdm.provenance import git_commit, machine_info
from cdm.viz import write_samples


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs="+", type=Path, required=True, help="finished pretraining directories")
    ap.add_argument("--judge", default="shipped:judge-emoji")
    ap.add_argument("--per-class", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/emoji/backbone-choice.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    judge = ImageClassifier.from_pretrained(args.judge)
    scorer = FIDScorer(judge, emoji(PUBLIC).images)
    labels = np.repeat(np.asarray(populated_categories()), args.per_class)
    rows = {}
    for run in args.runs:
        bb = Backbone.from_pretrained(run)
        rec = json.loads((run / "training.json").read_text())
        gen = generate_from_store(None, bb, labels=labels, solver="ddpm", steps=50, seed=1)
        write_samples(args.out.parent / "samples", f"backbone-{run.name}", gen.images, labels, nrow=args.per_class)
        pred, _, _ = classify(judge, gen.images)
        who = source_probs(judge, gen.images).argmax(1)
        c = rec["config"]
        rows[run.name] = {
            "image_size": c["img_size"], "patch_size": c["patch_size"],
            "tokens": (c["img_size"] // c["patch_size"]) ** 2,
            "steps": rec["steps_done"], "train_seconds": rec["wall_seconds"],
            "train_steps_per_second": round(rec["steps_done"] / rec["wall_seconds"], 3),
            "final_loss": round(rec["final_loss"], 4), "threads": rec["machine"].get("torch_threads"),
            "sample_seconds": round(gen.seconds, 1), "fid_noto": round(scorer(gen.images), 3),
            "category_acc": round(float(np.mean(pred == labels)), 4),
            "judged_noto": round(float(np.mean(who == ARTIST_ORDER.index(PUBLIC))), 4),
            "params": sum(p.numel() for p in bb.net.parameters()), "hash": bb.hash}
        print(run.name, json.dumps(rows[run.name]))
    atomic_write_json(args.out, {"candidates": rows, "n_samples": len(labels),
                                 "meta": {"commit": git_commit(), "machine": machine_info(), "judge": args.judge,
                                          "command": " ".join(shlex.quote(a) for a in sys.argv)}})


if __name__ == "__main__":
    main()
