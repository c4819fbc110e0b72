"""``cdm bench --dataset emoji``: five artists drew the same emoji; Noto is public (the backbone saw it), the other
four are protected sources, one compartment each, tagged with their licence.

Parts (each cached under ``OUT/parts/<part>.json``; stores under ``OUT/stores``, samples under ``OUT/samples``):

- ``judge``: the emoji judge's category and artist accuracy on real held-out images (half 0 of every artist).
- ``backbone``: class-balanced samples of the backbone (the populated categories), FID against Noto, category
  accuracy.
- ``artists``: per protected artist, a compartment trained on its half 0; its samples' FID against that artist
  (and the backbone's FID against the same images), the share the judge assigns to the artist.
- ``composed``: the four compartments composed with router, ito and naive weights: ``in_set``, the share of
  samples the judge gives one composed artist with probability >= 0.5; ``hybrid``, the share where no artist
  reaches 0.5.
- ``attribution``: unconditional samples along the probability-flow ODE, credited to the four sources; ``top1``:
  the top-credit source is the judge's artist, on samples the judge reads confidently (max probability >= 0.8).
- ``memorization``: per method, the share of samples nearer (pixel L2) a training image than the 5th
  percentile of train-to-train nearest-neighbour distances.
- ``forget``: forgetting one artist (a copy of the store): seconds, and what remains.

Every sample set is generated with the ancestral DDPM sampler, the same steps and seed for every method.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from .. import operations as ops
from ..backbone import Backbone
from ..compartments import CompartmentConfig
from ..data import EMOJI_CATEGORIES, ImageSpec, emoji
from ..evaluation import FIDScorer, ImageClassifier, classify, source_probs
from ..evaluation.emoji_judge import ARTIST_ORDER, TRAIN_HALF, artist_half, evaluate_judge, judge_data
from ..io import atomic_write_bytes, atomic_write_json
from ..provenance import git_commit, machine_info
from ..store import Store
from ..viz import write_samples
from .cache import PartCache

__all__ = ["EMOJI_PARTS", "EMOJI_PROFILES", "EmojiProfile", "PROTECTED", "PUBLIC", "populated_categories",
           "run_emoji_bench"]

PUBLIC = "noto"  # the backbone's pretraining data
PROTECTED = ("twemoji", "openmoji", "fluent", "emojione")  # one compartment each
WEIGHTINGS = ("router", "ito", "naive")
CONFIDENT = 0.8  # judge probability above which attribution is scored
EMOJI_PARTS = ("judge", "backbone", "artists", "composed", "attribution", "memorization", "forget")


@dataclass(frozen=True)
class EmojiProfile:
    steps: int = 1200  # optimiser steps of each artist's compartment (batch 64)
    n_prompts: int = 8  # prompts per block and category
    lr: float = 0.01  # compartment learning rate (Adam, cosine)
    router_steps: int = 400  # router head steps
    per_class: int = 25  # samples per populated category in every evaluated set (8 categories: 200)
    sample_steps: int = 50  # ancestral DDPM steps, every method
    guidance: float = 1.0  # classifier-free guidance (1: none)
    attribution_n: int = 48  # unconditional samples attributed
    attribution_steps: int = 25  # probability-flow ODE steps
    forget: str = "emojione"  # the artist forgotten in the forget part
    seed: int = 0


EMOJI_PROFILES: dict[str, EmojiProfile] = {
    "toy": EmojiProfile(steps=3, router_steps=2, per_class=2, sample_steps=3, attribution_n=4, attribution_steps=3),
    "quick": EmojiProfile(steps=500, router_steps=200, per_class=15, sample_steps=40, attribution_n=32),
    "full": EmojiProfile(),
}


def populated_categories(min_count: int = 20) -> list[int]:
    """Categories with at least ``min_count`` subjects in a training half (8 of the 10: Component and Flags
    are nearly empty among the subjects all five artists drew)."""
    counts = np.bincount(artist_half(PUBLIC, TRAIN_HALF).labels, minlength=len(EMOJI_CATEGORIES))
    return [int(k) for k in np.flatnonzero(counts >= min_count)]


class _Run:
    def __init__(self, p: EmojiProfile, out: Path, bb: Backbone, judge: ImageClassifier, progress: bool):
        self.p, self.out, self.bb, self.judge, self.progress = p, out, bb, judge, progress
        self.labels = np.repeat(np.asarray(populated_categories()), p.per_class)
        self.artist_index = {a: i for i, a in enumerate(ARTIST_ORDER)}
        self._scorers: dict[str, FIDScorer] = {}

    def scorer(self, artist: str) -> FIDScorer:
        """FID against all of ``artist``'s shipped emoji (1,081 images)."""
        if artist not in self._scorers:
            self._scorers[artist] = FIDScorer(self.judge, emoji(artist).images)
        return self._scorers[artist]

    def store(self) -> Store:
        path = self.out / "stores" / "artists"
        st = Store.open(path) if (path / "registry.sqlite").exists() else Store.create(path)
        have = {r["cid"] for r in st.compartments()}
        cfg = CompartmentConfig(steps=self.p.steps, n_prompts=self.p.n_prompts, lr=self.p.lr, seed=self.p.seed)
        for a in PROTECTED:
            if a not in have:
                ops.add_source(st, self.bb, artist_half(a, TRAIN_HALF), name=a, cfg=cfg, progress=self.progress)
        return st

    def sample(self, st: Store | None, sources: list[str], name: str, *, weighting: str = "ito",
               labels: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
        labels = self.labels if labels is None else labels
        gen = ops.generate_from_store(st, self.bb, sources, labels=labels, weighting=weighting, solver="ddpm",
                                      steps=self.p.sample_steps, guidance=self.p.guidance, seed=self.p.seed + 1,
                                      compose_seed=self.p.seed)
        write_samples(self.out / "samples", name, gen.images, labels, nrow=self.p.per_class)
        pred, _, _ = classify(self.judge, gen.images)
        return gen.images, {"seconds": round(gen.seconds, 1), "evals": gen.evals,
                            "category_acc": round(float(np.mean(pred == labels)), 4)}

    def artist_probs(self, images: np.ndarray) -> np.ndarray:
        return source_probs(self.judge, images)


# ------------------------------------------------------------------------------------------------------ parts


def _judge(r: _Run) -> dict:
    return {"judge": evaluate_judge(r.judge, *judge_data(TRAIN_HALF))}


def _backbone(r: _Run) -> dict:
    images, res = r.sample(None, [], "backbone")
    res["fid"] = round(r.scorer(PUBLIC)(images), 3)
    res["fid_by_artist"] = {a: round(r.scorer(a)(images), 3) for a in PROTECTED}
    probs = r.artist_probs(images)
    res["artist_share"] = {a: round(float(np.mean(probs.argmax(1) == i)), 4) for i, a in enumerate(ARTIST_ORDER)}
    return {"backbone": res}


def _artists(r: _Run, backbone: dict) -> dict:
    out = {}
    with r.store() as st:
        for a in PROTECTED:
            images, res = r.sample(st, [a], f"compartment-{a}")
            who = r.artist_probs(images).argmax(1)
            row = st.compartment(a)["manifest"]
            out[a] = {"fid_backbone": backbone["fid_by_artist"][a], "fid_compartment": round(r.scorer(a)(images), 3),
                      "artist_acc": round(float(np.mean(who == r.artist_index[a])), 4),
                      "category_acc": res["category_acc"], "train_seconds": row.get("wall_seconds"),
                      "tags": st.source(a)["tags"], "n_train": st.source(a)["n"]}
    return {"artists": out}


def _composed(r: _Run) -> dict:
    names = list(PROTECTED)
    idx = [r.artist_index[a] for a in names]
    out = {}
    with r.store() as st:
        if "router" not in {c["cid"] for c in st.compartments()}:
            ops.train_router_op(st, r.bb, names, progress=r.progress, steps=r.p.router_steps, seed=r.p.seed)
        for w in WEIGHTINGS:
            images, res = r.sample(st, names, f"composed-{w}", weighting=w)
            probs = r.artist_probs(images)
            res["in_set"] = round(float(np.mean(probs[:, idx].max(1) >= 0.5)), 4)
            res["hybrid"] = round(float(np.mean(probs.max(1) < 0.5)), 4)
            res["artist_share"] = {a: round(float(np.mean(probs.argmax(1) == i)), 4)
                                   for i, a in enumerate(ARTIST_ORDER)}
            out[w] = res
    return {"composed": out}


def _attribution(r: _Run) -> dict:
    names = list(PROTECTED)
    t0 = time.perf_counter()
    with r.store() as st:
        att = ops.attribute_samples(st, r.bb, names, n=r.p.attribution_n, seed=r.p.seed + 2,
                                    steps=r.p.attribution_steps, probes=2)
    write_samples(r.out / "samples", "attribution", att.images, None, nrow=8)
    probs = r.artist_probs(att.images)
    judged = probs.argmax(1)
    confident = probs.max(1) >= CONFIDENT
    top = np.clip(att.credit, 0, None).argmax(1)
    hit = np.asarray([ARTIST_ORDER[judged[i]] == names[top[i]] for i in range(len(top))])
    return {"attribution": {
        "top1": round(float(hit[confident].mean()), 4) if confident.any() else None,
        "n": int(len(top)), "confident": int(confident.sum()), "density": att.density,
        "judged_public": int(np.sum(judged[confident] == r.artist_index[PUBLIC])),
        "seconds": round(time.perf_counter() - t0, 1),
        "samples": [{"judge": ARTIST_ORDER[judged[i]], "prob": round(float(probs[i].max()), 3),
                     "credit": dict(zip(names, (round(float(c), 3) for c in att.credit[i]), strict=True))}
                    for i in range(len(top))]}}


def _nn_dist(a: np.ndarray, b: np.ndarray, exclude_self: bool = False) -> np.ndarray:
    """Nearest-neighbour L2 distance (pixels in [0, 1]) from each image of ``a`` to ``b``."""
    import torch

    x = torch.tensor(a.reshape(len(a), -1), dtype=torch.float32) / 255
    y = torch.tensor(b.reshape(len(b), -1), dtype=torch.float32) / 255
    d = torch.cdist(x, y)
    if exclude_self:
        d.fill_diagonal_(float("inf"))
    return d.min(1).values.numpy()


def _memorization(r: _Run) -> dict:
    train = {a: artist_half(a, TRAIN_HALF).images for a in PROTECTED}
    union = np.concatenate(list(train.values()))
    public = emoji(PUBLIC).images
    out = {}
    sets = {"backbone": ("backbone", public), **{a: (f"compartment-{a}", train[a]) for a in PROTECTED},
            **{w: (f"composed-{w}", union) for w in WEIGHTINGS}}
    for method, (name, ref) in sets.items():
        path = r.out / "samples" / f"{name}.npz"
        if not path.exists():
            continue
        with np.load(path, allow_pickle=False) as z:
            images = z["images"]
        threshold = float(np.percentile(_nn_dist(ref, ref, exclude_self=True), 5))
        out[method] = round(float(np.mean(_nn_dist(images, ref) < threshold)), 4)
    return {"memorization": out}


def _forget(r: _Run) -> dict:
    src = r.out / "stores" / "artists"
    r.store().close()
    copy = r.out / "stores" / "forget-copy"
    if copy.exists():
        shutil.rmtree(copy)
    shutil.copytree(src, copy)
    with Store.open(copy) as st:
        res = ops.forget_source(st, r.p.forget, reason="bench: the artist withdrew consent")
        remaining = [s["id"] for s in st.sources()]
        problems = st.verify()
    shutil.rmtree(copy)
    return {"forget_seconds": round(res.seconds, 4), "forget": {"source": r.p.forget, "removed": res.removed,
                                                                 "remaining": remaining, "problems": problems}}


# ------------------------------------------------------------------------------------------------------ runner


def run_emoji_bench(profile: str | EmojiProfile, out: str | Path, *, backbone: str | Path, judge: str | Path,
                    parts: tuple[str, ...] = EMOJI_PARTS, progress: bool = False, meta: dict | None = None,
                    **overrides) -> dict:
    """Run (or resume) the emoji benchmark; returns the merged results, also written to ``out/results.json``
    and ``out/report.md``."""
    name = profile if isinstance(profile, str) else "custom"
    if isinstance(profile, str):
        if profile not in EMOJI_PROFILES:
            raise ValueError(f"unknown profile {profile!r}; known: {', '.join(EMOJI_PROFILES)}")
        profile = EMOJI_PROFILES[profile]
    profile = replace(profile, **{k: v for k, v in overrides.items() if v is not None})
    unknown = [p for p in parts if p not in EMOJI_PARTS]
    if unknown:
        raise ValueError(f"unknown parts {unknown}; known: {', '.join(EMOJI_PARTS)}")
    if profile.forget not in PROTECTED:
        raise ValueError(f"forget must be one of the protected artists ({', '.join(PROTECTED)})")
    bb = Backbone.from_pretrained(backbone)
    if bb.codec.spec != ImageSpec(32, 32, 3) or bb.config.num_classes != len(EMOJI_CATEGORIES) + 1:
        raise ValueError(f"{backbone}: the emoji benchmark needs a backbone of 32x32 RGB images (pixels or latents) "
                         f"conditional on the {len(EMOJI_CATEGORIES)} emoji categories (shipped:backbone-emoji, "
                         "shipped:backbone-emoji-latent)")
    judge_net = ImageClassifier.from_pretrained(judge)
    if (judge_net.config.image_size, judge_net.config.channels, judge_net.config.num_sources) != \
            (32, 3, len(ARTIST_ORDER)):
        raise ValueError(f"{judge}: not an emoji judge (32x32 RGB with an artist head; shipped:judge-emoji)")
    out = Path(out)
    (out / "parts").mkdir(parents=True, exist_ok=True)
    prof_file = out / "profile.json"
    current = json.loads(json.dumps(asdict(profile)))
    if prof_file.exists() and json.loads(prof_file.read_text()) != current:
        raise ValueError(f"{out} holds a run with another profile; use another --out or delete it")
    atomic_write_json(prof_file, current)
    r = _Run(profile, out, bb, judge_net, progress)
    need = PartCache(out, EMOJI_PARTS, {
        "judge": lambda: _judge(r),
        "backbone": lambda: _backbone(r),
        "artists": lambda: _artists(r, need("backbone")["backbone"]),
        "composed": lambda: _composed(r),
        "attribution": lambda: _attribution(r),
        "memorization": lambda: (need("backbone"), need("artists"), need("composed"), _memorization(r))[-1],
        "forget": lambda: _forget(r),
    }, stamp={"machine": machine_info(), "command": (meta or {}).get("command")})
    for part in parts:
        need(part)
    results = need.merged()
    results["targets"] = targets(results)
    results["meta"] = {"commit": git_commit(), "machine": machine_info(), "profile": name, "profile_config": current,
                       "backbone": str(backbone), "backbone_hash": bb.hash, "judge": str(judge),
                       "space": "latent" if bb.latent else "pixels",
                       "categories": [EMOJI_CATEGORIES[k] for k in populated_categories()],
                       "part_seconds": need.field("wall_seconds"), "part_commits": need.field("commit"),
                       **(meta or {})}
    atomic_write_json(out / "results.json", results)
    atomic_write_bytes(out / "report.md", report(results).encode())
    return results


def targets(res: dict) -> dict:
    """The issue's targets, each True / False (None while its part has not run)."""
    t: dict = {}
    arts = res.get("artists")
    if arts:
        t["compartment_beats_backbone_fid"] = all(v["fid_compartment"] < v["fid_backbone"] for v in arts.values())
        t["judge_assigns_080_to_own_artist"] = all(v["artist_acc"] >= 0.8 for v in arts.values())
    comp = res.get("composed")
    if comp and "naive" in comp:
        t["hybrid_at_most_half_of_naive"] = {w: comp[w]["hybrid"] <= comp["naive"]["hybrid"] / 2
                                             for w in comp if w != "naive"}
    att = res.get("attribution")
    if att:
        t["attribution_top1_090"] = None if att["top1"] is None else att["top1"] >= 0.9
    return t


def report(res: dict) -> str:
    """report.md: the tables of results.json, with what each number means."""
    lines = ["# Emoji by five artists", "",
             "Noto is public (the backbone's only data); Twemoji, OpenMoji, Fluent and EmojiOne are protected "
             "sources, one compartment each (trained on half 0 of the artist's emoji). The judge was trained on "
             "the other halves. FIDs are on the judge's features (comparable within this benchmark only).", ""]
    m = res.get("meta", {})
    lines += [f"commit `{str(m.get('commit'))[:12]}`, profile `{m.get('profile')}`, command `{m.get('command')}`", ""]
    if "judge" in res:
        j = res["judge"]
        lines += ["## Judge (real held-out images)", "", "| category acc | artist acc | down-up category | "
                  "down-up artist |", "|---|---|---|---|",
                  f"| {j['category_acc']:.3f} | {j['artist_acc']:.3f} | {j['down_up_category_acc']:.3f} | "
                  f"{j['down_up_artist_acc']:.3f} |", ""]
    if "backbone" in res:
        b = res["backbone"]
        lines += ["## Backbone", "", f"FID vs Noto {b['fid']:.2f}; category accuracy {b['category_acc']:.3f}.", ""]
    if "artists" in res:
        lines += ["## Each artist's compartment", "", "| artist | tags | FID backbone | FID compartment | "
                  "judge says this artist | category acc |", "|---|---|---|---|---|---|"]
        for a, v in res["artists"].items():
            lines.append(f"| {a} | {', '.join(v['tags'])} | {v['fid_backbone']:.2f} | {v['fid_compartment']:.2f} | "
                         f"{v['artist_acc']:.3f} | {v['category_acc']:.3f} |")
        lines.append("")
    if "composed" in res:
        lines += ["## The four composed", "", "| weighting | in set | hybrid | category acc | evals |",
                  "|---|---|---|---|---|"]
        for w, v in res["composed"].items():
            lines.append(f"| {w} | {v['in_set']:.3f} | {v['hybrid']:.3f} | {v['category_acc']:.3f} | {v['evals']} |")
        lines.append("")
    if "attribution" in res:
        a = res["attribution"]
        top1 = "n/a" if a["top1"] is None else f"{a['top1']:.3f}"
        lines += ["## Attribution", "", f"top-1 {top1} on {a['confident']} of {a['n']} samples the judge reads "
                  f"confidently ({a['judged_public']} of them judged Noto: a miss by construction).", ""]
    if "memorization" in res:
        lines += ["## Memorization", "", "| method | share nearer than the 5th percentile |", "|---|---|"]
        lines += [f"| {k} | {v:.3f} |" for k, v in res["memorization"].items()]
        lines.append("")
    if "forget_seconds" in res:
        lines += ["## Forgetting", "", f"forget `{res['forget']['source']}`: {res['forget_seconds']:.3f} s, no "
                  f"training; remaining {', '.join(res['forget']['remaining'])}.", ""]
    if res.get("targets"):
        lines += ["## Targets", "", "```json", json.dumps(res["targets"], indent=2), "```", ""]
    return "\n".join(lines)
