"""Text-conditioned compartments on the emoji benchmark: captions in, images out, composed across artists.

The four protected artists (twemoji, openmoji, fluent, emojione) each train a text compartment on their
training half (``emoji:ARTIST/strat2-0``, captions: the Unicode name and subcategory, "red apple, food fruit")
on the frozen latent emoji backbone (``shipped:backbone-emoji-latent``, pretrained on Noto only, which has never
seen a caption). Every compartment: the caption's all-MiniLM-L6-v2 embedding -> linear -> prompt tokens in every
block, gated deep prompts, and (``--adapter-rank``) parallel FFN adapters; the empty caption on 10% of batches.

Evaluation captions are **held out**: those of the other half (``strat2-1``: subjects no compartment saw),
``--per-artist`` of each artist. Every sample set uses the same captions, noise seed, ancestral DDPM sampler and
guidance. Judges: the shipped emoji judge (category, artist; its penultimate features for FID) and the
subcategory judge (``judge-emoji-subcategory``), both trained on the ``strat2-1`` halves.

* ``faithfulness``: share of samples whose caption's subcategory (and category) the judges read.
  ``backbone``: the frozen backbone cannot read a caption: its unconditional samples (``backbone_category``: the
  backbone given the caption's category label, a baseline that knows more than text); ``compartment``: each
  artist's compartment on its own artist's captions; ``composed``: the four composed with Itô weights on all
  captions; ``naive``: the same four averaged with their data shares.
* ``fid_vs_splits`` (the paper's Figure 2A): the four artists' training halves as 1, 2 (two artists each) or 4
  sources; FID of the composed (Itô) and naive samples against the held-out halves' real images.
* ``adapters``: faithfulness and FID of the four-way composition with and without adapters.

    python benchmarks/text.py --runs runs/text --out benchmarks/results/text
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from cdm.backbone import Backbone
from cdm.compartments import CompartmentConfig
from cdm.data import EMOJI_CATEGORIES, concat_sources, load_source
from cdm.evaluation import FIDScorer, ImageClassifier, classify, source_probs
from cdm.evaluation.emoji_judge import (ARTIST_ORDER, SUBCATEGORIES, SUBCATEGORY_CATEGORY, half_subcategories,
                                       load_subcategory_judge, subcategory_of)
from cdm.io import atomic_write_json
from cdm.operations import add_source, generate_from_store
from cdm.provenance import git_commit, machine_info
from cdm.store import Store
from cdm.text import MINILM
from cdm.viz import write_samples

PROTECTED = ("twemoji", "openmoji", "fluent", "emojione")
SPLITS = {"1": [PROTECTED], "2": [PROTECTED[:2], PROTECTED[2:]], "4": [(a,) for a in PROTECTED]}


def half(artist: str, k: int):
    return load_source(f"emoji:{artist}/strat2-{k}")


def held_out(artist: str, n: int, seed: int, k: int = 1) -> dict:
    """``n`` captions of the artist's held-out half (``k=0``: of its training half), with their subcategory and
    category."""
    src = half(artist, k)
    subs = half_subcategories(artist, k)  # aligned with the split's rows
    pick = np.sort(np.random.default_rng(seed).choice(len(src), size=min(n, len(src)), replace=False))
    return {"captions": [src.captions[i] for i in pick], "sub": [int(subs[i]) for i in pick],
            "cat": [int(src.labels[i]) for i in pick], "artist": [artist] * len(pick)}


def store_of(root: Path, bb: Backbone, groups, cfg: CompartmentConfig) -> tuple[Store, list[str]]:
    """A store with one text compartment per group of artists (training halves), trained unless present."""
    st = Store.open(root) if (root / "registry.sqlite").exists() else Store.create(root)
    names = []
    have = {r["cid"] for r in st.compartments()}
    for group in groups:
        name = "-".join(group)
        names.append(name)
        if name in have:
            continue
        src = concat_sources([half(a, 0) for a in group], id=name) if len(group) > 1 else half(group[0], 0)
        t0 = time.perf_counter()
        add_source(st, bb, src, name=name, cfg=cfg, progress=False)
        print(f"  trained {root.name}/{name} ({len(src)} images) in {time.perf_counter() - t0:.0f} s", flush=True)
    return st, names


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backbone", default="shipped:backbone-emoji-latent")
    ap.add_argument("--judge", default="shipped:judge-emoji")
    ap.add_argument("--subjudge", default="shipped:judge-emoji-subcategory")
    ap.add_argument("--steps", type=int, default=600, help="optimiser steps of every compartment (batch 64)")
    ap.add_argument("--adapter-rank", type=int, default=16)
    ap.add_argument("--text-tokens", type=int, default=4)
    ap.add_argument("--per-artist", type=int, default=50, help="held-out captions per artist")
    ap.add_argument("--sample-steps", type=int, default=50)
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=Path, default=Path("runs/text"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/text"))
    ap.add_argument("--seen", action="store_true", help="add faithfulness['seen_captions'] to --out's results.json: "
                    "the four-way composition on captions of its TRAINING halves (how much of the held-out gap is "
                    "generalisation); needs the trained stores")
    ap.add_argument("--train-only", default=None, help="comma-separated stores (split4, split4-no-adapters, split2, "
                    "split1): train their compartments and stop (to train in parallel processes; then run without)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    args.runs.mkdir(parents=True, exist_ok=True)
    bb = Backbone.from_pretrained(args.backbone)
    judge = ImageClassifier.from_pretrained(args.judge)
    subjudge = load_subcategory_judge(args.subjudge)
    cfg = CompartmentConfig(text_encoder=MINILM, text_tokens=args.text_tokens, adapter_rank=args.adapter_rank,
                            steps=args.steps, seed=args.seed)
    plain = replace(cfg, adapter_rank=0)
    stores = {"split4": (SPLITS["4"], cfg), "split4-no-adapters": (SPLITS["4"], plain), "split2": (SPLITS["2"], cfg),
              "split1": (SPLITS["1"], cfg)}
    if args.train_only:
        for name in args.train_only.split(","):
            store_of(args.runs / name, bb, *stores[name])[0].close()
        return 0

    evals = {a: held_out(a, args.per_artist, args.seed, k=0 if args.seen else 1) for a in PROTECTED}
    captions = sum((evals[a]["captions"] for a in PROTECTED), [])
    sub = np.array(sum((evals[a]["sub"] for a in PROTECTED), []))
    cat = np.array(sum((evals[a]["cat"] for a in PROTECTED), []))
    scorer = FIDScorer(judge, np.concatenate([half(a, 1).images for a in PROTECTED]))
    samples: dict[str, np.ndarray] = {}

    def draw(tag: str, st: Store | None, names: list[str], weighting: str = "ito", caps=None, labels=None, n=None):
        t0 = time.perf_counter()
        gen = generate_from_store(st, bb, names, captions=caps, labels=labels, n=n, weighting=weighting,
                                  solver="ddpm", steps=args.sample_steps, guidance=args.guidance, seed=args.seed + 1,
                                  batch_size=100)
        samples[tag] = gen.images
        write_samples(args.runs / "samples", tag.replace("/", "_"), gen.images[:64], None, nrow=8)
        print(f"  sampled {tag}: {len(gen.images)} in {time.perf_counter() - t0:.0f} s", flush=True)
        return gen.images

    def faith(images: np.ndarray, want_sub: np.ndarray, want_cat: np.ndarray) -> dict:
        got_sub = subcategory_of(subjudge, images)
        got_cat, _, _ = classify(judge, images)
        return {"subcategory": round(float(np.mean(got_sub == want_sub)), 4),
                "category": round(float(np.mean(got_cat == want_cat)), 4),
                "category_via_subcategory": round(float(np.mean(np.asarray(SUBCATEGORY_CATEGORY)[got_sub] == want_cat)),
                                                  4)}

    if args.seen:
        res = json.loads((args.out / "results.json").read_text())
        st4, names4 = store_of(args.runs / "split4", bb, *stores["split4"])
        seen = {"composed": faith(draw("composed-seen", st4, names4, caps=captions), sub, cat),
                "naive": faith(draw("naive-seen", st4, names4, "naive", caps=captions), sub, cat),
                "n": len(captions), "command": shlex.join([sys.executable.rsplit("/", 1)[-1], *sys.argv]),
                "commit": git_commit(), "seconds": round(time.perf_counter() - t_start, 1)}
        st4.close()
        res["faithfulness"]["seen_captions"] = seen
        atomic_write_json(args.out / "results.json", res)
        print(json.dumps(seen, indent=1))
        return 0

    res: dict = {"faithfulness": {}, "fid_vs_splits": {}, "adapters": {}, "artist": {}}
    print("training", flush=True)
    st4, names4 = store_of(args.runs / "split4", bb, *stores["split4"])
    st4p, names4p = store_of(args.runs / "split4-no-adapters", bb, *stores["split4-no-adapters"])
    st2, names2 = store_of(args.runs / "split2", bb, *stores["split2"])
    st1, names1 = store_of(args.runs / "split1", bb, *stores["split1"])
    t_train = time.perf_counter() - t_start

    print("sampling", flush=True)
    f = res["faithfulness"]
    f["backbone"] = faith(draw("backbone", None, [], n=len(captions)), sub, cat)
    f["backbone_category"] = faith(draw("backbone-category", None, [], labels=cat), sub, cat)
    per = {}
    for a, name in zip(PROTECTED, names4, strict=True):
        e = evals[a]
        per[a] = faith(draw(f"compartment/{a}", st4, [name], caps=e["captions"]), np.array(e["sub"]),
                       np.array(e["cat"]))
    f["compartment"] = {k: round(float(np.mean([per[a][k] for a in PROTECTED])), 4) for k in per[PROTECTED[0]]}
    f["compartment_by_artist"] = per
    f["composed"] = faith(draw("composed", st4, names4, caps=captions), sub, cat)
    f["naive"] = faith(draw("naive", st4, names4, "naive", caps=captions), sub, cat)
    # whose style: the judge's artist head on the composed samples, against the caption's artist
    want_artist = np.array([ARTIST_ORDER.index(a) for a in sum((evals[a]["artist"] for a in PROTECTED), [])])
    for tag in ("composed", "naive"):
        who = source_probs(judge, samples[tag]).argmax(1)
        res["artist"][tag] = round(float(np.mean(who == want_artist)), 4)

    for k, (st, names) in {"1": (st1, names1), "2": (st2, names2), "4": (st4, names4)}.items():
        if k == "1":
            images = draw("split1", st, names, caps=captions)
            res["fid_vs_splits"][k] = {"composed": round(scorer(images), 3), "naive": round(scorer(images), 3)}
            continue
        res["fid_vs_splits"][k] = {
            "composed": round(scorer(samples["composed"] if k == "4" else draw(f"split{k}", st, names, caps=captions)),
                              3),
            "naive": round(scorer(samples["naive"] if k == "4" else draw(f"split{k}-naive", st, names, "naive",
                                                                          caps=captions)), 3)}
    plain_images = draw("composed-no-adapters", st4p, names4p, caps=captions)
    res["adapters"] = {
        "with": {"faithfulness": f["composed"], "fid": res["fid_vs_splits"]["4"]["composed"],
                 "heldout_loss": _heldout(st4, names4)},
        "without": {"faithfulness": faith(plain_images, sub, cat), "fid": round(scorer(plain_images), 3),
                    "heldout_loss": _heldout(st4p, names4p)}}
    res["fid_backbone"] = round(scorer(samples["backbone"]), 3)
    res["targets"] = {
        "composed_vs_backbone_points": round(100 * (f["composed"]["subcategory"] - f["backbone"]["subcategory"]), 2),
        "faithfulness_plus_14": f["composed"]["subcategory"] >= f["backbone"]["subcategory"] + 0.14,
        "composed_fid_below_naive_2_and_4": all(res["fid_vs_splits"][k]["composed"] < res["fid_vs_splits"][k]["naive"]
                                                for k in ("2", "4"))}
    res["meta"] = {
        "command": shlex.join([sys.executable.rsplit("/", 1)[-1], *sys.argv]), "commit": git_commit(),
        "machine": machine_info(), "threads": args.threads, "backbone": args.backbone, "judge": args.judge,
        "subcategory_judge": args.subjudge, "text_encoder": MINILM, "compartment": cfg.to_dict(),
        "held_out_captions": len(captions), "per_artist": args.per_artist, "solver": "ddpm",
        "sample_steps": args.sample_steps, "guidance": args.guidance, "seed": args.seed,
        "chance": {"subcategory": round(1 / len(SUBCATEGORIES), 4), "category": round(1 / len(EMOJI_CATEGORIES), 4)},
        "train_seconds_this_process": round(t_train, 1), "seconds": round(time.perf_counter() - t_start, 1),
        "compartment_wall_seconds": {f"{st.path.name}/{n}": st.compartment(n)["manifest"]["wall_seconds"]
                                     for st, names in ((st4, names4), (st4p, names4p), (st2, names2), (st1, names1))
                                     for n in names}}
    for st in (st4, st4p, st2, st1):
        st.close()
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "results.json", res)
    print(json.dumps({k: res[k] for k in ("faithfulness", "fid_vs_splits", "adapters", "targets")}, indent=1))
    return 0


def _heldout(st: Store, names: list[str]) -> float:
    """Mean best held-out loss of the compartments (their training records)."""
    return round(float(np.mean([st.compartment(n)["manifest"]["validation"]["best_loss"] for n in names])), 5)


if __name__ == "__main__":
    raise SystemExit(main())
