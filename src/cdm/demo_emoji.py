"""``cdm demo --dataset emoji``: five artists drew the same emoji; a newcomer's run of a few minutes.

1. Sample the shipped emoji backbone (pretrained on Google's Noto only) and let the emoji judge say who drew it.
2. Add the four protected artists (Twemoji, OpenMoji, Fluent, EmojiOne), one compartment each, tagged with their
   licence; sample each and let the judge say whose style it is.
3. Compose the four (Itô weights) next to naive averaging: the composition draws in one artist's style, the
   average blends them.
4. Attribute unconditional samples to the artists whose compartments made them.
5. Grant a key every CC-BY source by tag, then forget one artist and show what remains.
6. (``text=True``) Text compartments: the same four artists trained on their emoji's captions ("red apple, food
   fruit"); draw held-out captions (subjects no compartment saw) from the composition.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from .backbone import Backbone
from .benchmark.emoji import PROTECTED, PUBLIC, populated_categories
from .compartments import CompartmentConfig
from .data import EMOJI_CATEGORIES, ImageSpec
from .demo import fresh_store
from .evaluation import ImageClassifier, classify, source_probs
from .evaluation.emoji_judge import ARTIST_ORDER, TRAIN_HALF, artist_half
from .io import atomic_write_bytes, atomic_write_json
from .operations import add_source, attribute_samples, forget_source, generate_from_store
from .server.keys import create_key
from .viz import write_samples

__all__ = ["run_emoji_demo"]


def _who(judge: ImageClassifier, images: np.ndarray) -> dict:
    """The judge's artist shares over a sample set."""
    probs = source_probs(judge, images)
    return {a: round(float(np.mean(probs.argmax(1) == i)), 3) for i, a in enumerate(ARTIST_ORDER)}


def run_emoji_demo(out: Path, *, backbone: Path, judge: Path, per_class: int = 6, steps: int = 100, seed: int = 0,
                   progress: bool = True, log=print, text: bool = False) -> dict:
    t_all = time.perf_counter()
    bb = Backbone.from_pretrained(backbone)
    judge_net = ImageClassifier.from_pretrained(judge)
    if bb.codec.spec != ImageSpec(32, 32, 3) or judge_net.config.num_sources != len(ARTIST_ORDER):
        raise ValueError("the emoji demo needs an emoji backbone of 32x32 RGB images and the emoji judge "
                         "(shipped:backbone-emoji or shipped:backbone-emoji-latent, shipped:judge-emoji)")
    labels = np.repeat(np.asarray(populated_categories()), per_class)
    sample = dict(solver="ddpm", steps=50, seed=seed)
    results: dict = {"per_class": per_class, "steps": steps, "seed": seed}

    # 1. the backbone
    gen = generate_from_store(None, bb, labels=labels, progress=progress, **sample)
    write_samples(out, "backbone", gen.images, labels, nrow=per_class)
    pred, _, _ = classify(judge_net, gen.images)
    results["backbone"] = {"category_acc": round(float(np.mean(pred == labels)), 3), "judge_says": _who(judge_net,
                                                                                                          gen.images)}
    log(f"backbone: the judge reads {results['backbone']['judge_says'][PUBLIC]:.0%} of its samples as Noto")

    # 2. one compartment per protected artist
    cfg = CompartmentConfig(steps=steps, seed=seed)
    comps: dict = {}
    with fresh_store(out / "store") as st:
        for a in PROTECTED:
            res = add_source(st, bb, artist_half(a, TRAIN_HALF), name=a, cfg=cfg, progress=progress)
            gen = generate_from_store(st, bb, [a], labels=labels, **sample)
            write_samples(out, f"compartment-{a}", gen.images, labels, nrow=per_class)
            says = _who(judge_net, gen.images)
            comps[a] = {"n": st.source(a)["n"], "tags": st.source(a)["tags"], "train_seconds": res.record.wall_seconds,
                        "judge_says_own_artist": says[a], "backbone_judged_so": results["backbone"]["judge_says"][a]}
            log(f"compartment {a} ({', '.join(comps[a]['tags'])}): {res.record.wall_seconds:.0f} s; the judge reads "
                f"{says[a]:.0%} of its samples as {a} (backbone: {results['backbone']['judge_says'][a]:.0%})")
        results["compartments"] = comps

        # 3. the composition, and the naive average it replaces
        composed = {}
        for w in ("ito", "naive"):
            gen = generate_from_store(st, bb, list(PROTECTED), labels=labels, weighting=w, **sample)
            write_samples(out, f"composed-{w}", gen.images, labels, nrow=per_class)
            probs = source_probs(judge_net, gen.images)
            composed[w] = {"hybrid": round(float(np.mean(probs.max(1) < 0.5)), 3), "judge_says": _who(judge_net,
                                                                                                     gen.images)}
            log(f"composed ({w}): {composed[w]['hybrid']:.0%} of samples are hybrids no artist owns")
        results["composed"] = composed

        # 4. attribution: which artist's compartment made each unconditional sample
        att = attribute_samples(st, bb, list(PROTECTED), n=2 * per_class, seed=seed + 2, steps=20, probes=2)
        write_samples(out, "attribution", att.images, None, nrow=per_class)
        probs = source_probs(judge_net, att.images)
        top = np.clip(att.credit, 0, None).argmax(1)
        conf = probs.max(1) >= 0.8
        agree = [ARTIST_ORDER[probs[i].argmax()] == PROTECTED[top[i]] for i in range(len(top))]
        results["attribution"] = {"n": len(top), "confident": int(conf.sum()),
                                  "top_credit_is_judges_artist": None if not conf.any() else
                                  round(float(np.mean(np.asarray(agree)[conf])), 3),
                                  "credits": [dict(zip(PROTECTED, (round(float(c), 3) for c in row), strict=True))
                                              for row in att.credit]}
        a = results["attribution"]
        log(f"attribution: {a['confident']} of {a['n']} samples read confidently; the top-credit artist is the "
            f"judge's for {(a['top_credit_is_judges_artist'] or 0):.0%} of them")

        # 5. licences as grants, then forget an artist
        _, key = create_key(st, "cc-by-customer", tags=["license:CC-BY-*"], actor="demo")
        results["key"] = {"tags": list(key.tags), "may_use": list(key.sources)}
        forgotten = forget_source(st, "emojione", reason="demo: the artist withdrew consent")
        after = [k for k in st.keys() if k["name"] == "cc-by-customer"][0]
        results["forget"] = {"source": "emojione", "seconds": round(forgotten.seconds, 4),
                             "removed": forgotten.removed, "remaining": [s["id"] for s in st.sources()],
                             "key_may_use_after": after["sources"], "store_problems": st.verify()}
        audit = st.audit_log(limit=6)
    if text:
        results["text"] = _text_step(out, bb, judge_net, per_class=per_class, steps=steps, seed=seed, sample=sample,
                                     progress=progress, log=log)
    results["seconds"] = round(time.perf_counter() - t_all, 1)
    atomic_write_json(out / "results.json", results)
    atomic_write_bytes(out / "report.md", _report(results, audit).encode())
    log(f"forgot emojione in {forgotten.seconds:.3f} s; report -> {out / 'report.md'}")
    return results


def held_out_prompts(k: int = 6) -> tuple[list[str], list[int]]:
    """``k`` captions of the protected artists' held-out halves (subjects no demo compartment trained on), one per
    populated category in turn, and their categories."""
    half = artist_half(PROTECTED[0], 1 - TRAIN_HALF)
    picks, cats = [], []
    for c in populated_categories():
        rows = np.flatnonzero(half.labels == c)
        if len(rows) and len(picks) < k:
            picks.append(half.captions[int(rows[0])])
            cats.append(int(c))
    return picks, cats


def _text_step(out: Path, bb: Backbone, judge: ImageClassifier, *, per_class: int, steps: int, seed: int,
               sample: dict, progress: bool, log) -> dict:
    from .text import MINILM

    cfg = CompartmentConfig(text_encoder=MINILM, adapter_rank=16, steps=steps, seed=seed)
    prompts, cats = held_out_prompts()
    captions = [c for c in prompts for _ in range(per_class)]
    want = np.repeat(np.asarray(cats), per_class)
    res: dict = {"prompts": prompts, "steps": steps}
    with fresh_store(out / "store-text") as st:
        for a in PROTECTED:
            add_source(st, bb, artist_half(a, TRAIN_HALF), name=a, cfg=cfg, progress=progress)
        for w in ("ito", "naive"):
            gen = generate_from_store(st, bb, list(PROTECTED), captions=captions, weighting=w, guidance=3.0, **sample)
            write_samples(out, f"text-{w}", gen.images, None, nrow=per_class)
            pred, _, _ = classify(judge, gen.images)
            res[w] = {"category_acc": round(float(np.mean(pred == want)), 3), "judge_says": _who(judge, gen.images)}
    log(f"text: {len(prompts)} held-out captions; the judge reads the caption's category in "
        f"{res['ito']['category_acc']:.0%} of the composed samples (naive {res['naive']['category_acc']:.0%})")
    return res


def _report(r: dict, audit: list[dict]) -> str:
    cats = ", ".join(EMOJI_CATEGORIES[k] for k in populated_categories())
    b = r["backbone"]
    rows = "\n".join(f"| {a} | {', '.join(c['tags'])} | {c['n']} | {c['train_seconds']:.0f} | "
                     f"{c['judge_says_own_artist']:.0%} | {c['backbone_judged_so']:.0%} |"
                     for a, c in r["compartments"].items())
    grids = " ".join(f"![{a}](compartment-{a}.png)" for a in r["compartments"])
    c = r["composed"]
    a = r["attribution"]
    f = r["forget"]
    audit_rows = "\n".join(f"| {x['seq']} | {x['ts'][:19]} | {x['actor']} | {x['action']} | {x['target']} |"
                           for x in audit)
    agree = "n/a" if a["top_credit_is_judges_artist"] is None else f"{a['top_credit_is_judges_artist']:.0%}"
    return f"""# cdm demo: emoji by five artists

Five artists drew the same emoji under open licences. Google's Noto is the public data: the shipped backbone
was pretrained on it alone. Twemoji, OpenMoji, Fluent and EmojiOne are protected sources, one compartment each,
trained on half of each artist's emoji ({r['steps']} steps). Rows: {cats}; {r['per_class']} samples each,
ancestral sampler, 50 steps, seed {r['seed']}. The emoji judge (trained on the artists' other halves) says
whose style each sample is.

## 1. The backbone (Noto only)

![backbone](backbone.png)

Judge: category accuracy {b['category_acc']:.0%}; read as Noto {b['judge_says']['noto']:.0%}.

## 2. One compartment per artist

| artist | tags | images | train s | judge: this artist | backbone judged so |
|---|---|---|---|---|---|
{rows}

{grids}

## 3. Composition

The four compartments composed with Itô weights (the posterior that a noisy sample came from each artist, Prop.
3.1) draw each sample in one artist's style; averaging their predictions (naive) blends styles into hybrids no
artist drew. Hybrids (no artist with judge probability >= 0.5): Itô {c['ito']['hybrid']:.0%}, naive
{c['naive']['hybrid']:.0%}.

![ito](composed-ito.png) ![naive](composed-naive.png)

## 4. Attribution

{a['n']} unconditional samples along the probability-flow ODE, each credited to the artists by the change in
log-likelihood their compartments explain. {a['confident']} are read confidently by the judge; for {agree} of
them the top-credit artist is the judge's.

![attribution](attribution.png)

## 5. Licences as grants, and forgetting

Each compartment's licence is a store tag. A key granted `{', '.join(r['key']['tags'])}` may use
{', '.join(r['key']['may_use'])}. Then `emojione` is forgotten ({f['seconds']:.3f} s, no training): removed
{', '.join(f['removed'])}; remaining sources {', '.join(f['remaining'])}; the same key may now use
{', '.join(f['key_may_use_after'])}. Store check: {'clean' if not f['store_problems'] else f['store_problems']}.

| seq | time | actor | action | target |
|---|---|---|---|---|
{audit_rows}
{_text_report(r)}
Whole demo: {r['seconds']:.0f} s.
"""


def _text_report(r: dict) -> str:
    if "text" not in r:
        return ""
    t = r["text"]
    rows = "\n".join(f"{i + 1}. {p}" for i, p in enumerate(t["prompts"]))
    return f"""
## 6. Captions in, images out

The same four artists as text compartments (the caption's all-MiniLM-L6-v2 embedding -> a linear map -> prompt
tokens in every block, plus parallel adapters; {t['steps']} steps each), drawn for captions of subjects no
compartment trained on, one row each, guidance 3:

{rows}

Itô composition (the judge reads the caption's category in {t['ito']['category_acc']:.0%}) and the naive average
({t['naive']['category_acc']:.0%}):

![text ito](text-ito.png) ![text naive](text-naive.png)
"""
