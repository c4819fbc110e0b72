#!/usr/bin/env python
"""Train the emoji subcategory judge (94 Unicode subcategories + the 5-artist head) and write the bundle.

The shipped ``src/cdm/weights/judge-emoji-subcategory`` was made, on one thread, with::

    OMP_NUM_THREADS=1 python scripts/train_subcategory_judge.py --steps STEPS \\
        --out src/cdm/weights/judge-emoji-subcategory

(the exact command, commit and machine are in its ``training.json``). Training uses half 1 of each artist
(``emoji:ARTIST/strat2-1``); the record's ``held_out`` is measured on half 0.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch

from cdm.evaluation.emoji_judge import train_subcategory_judge
from cdm.provenance import git_commit, machine_info


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2500, help="optimiser steps")
    ap.add_argument("--seed", type=int, default=0, help="seed of initialisation and batches")
    ap.add_argument("--out", type=Path, required=True, help="directory for the classifier bundle")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    if args.steps < 1:
        ap.error("--steps must be >= 1")
    torch.set_num_threads(args.threads)
    command = shlex.join(["python", "scripts/train_subcategory_judge.py", *(sys.argv[1:] if argv is None else argv)])
    model, record = train_subcategory_judge(steps=args.steps, seed=args.seed, progress=not args.no_progress)
    record.update(command=command, commit=git_commit(), machine=machine_info())
    model.save_pretrained(args.out, record=record)
    print(json.dumps(record["held_out"], indent=2))
    print(f"train wall_seconds {record['wall_seconds']}; wrote {args.out}")


if __name__ == "__main__":
    main()
