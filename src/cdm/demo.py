"""``cdm demo``: the main job on the embedded data, a report a newcomer opens first.

1. Sample the shipped backbone (public data only) and score it with the shipped classifier.
2. Build a compartment store from two protected sources (digits 0-4 and 5-9), train one compartment each,
   sample from each, compose both (Ito weights; a weight plot), attribute unconditional samples to the sources
   that made them (likelihood credit over each source's class mixture), then forget one source and show that
   it is gone (registry and audit log).
"""

from __future__ import annotations

import io as _io
import shutil
import time
from pathlib import Path

import numpy as np

from .backbone import Backbone
from .compartments import CompartmentConfig
from .data import load_source
from .evaluation import DigitClassifier, classify, judge, score_samples
from .generation import class_labels
from .io import atomic_write_bytes, atomic_write_json
from .operations import add_source, attribute_samples, forget_source, generate_from_store
from .store import Store
from .viz import write_samples

__all__ = ["fresh_store", "plot_weights", "run_demo"]

DEMO_SOURCES = {"digits-0-4": "mnist/protected/classes[0-4|5-9]-0", "digits-5-9": "mnist/protected/classes[0-4|5-9]-1"}


def fresh_store(path: Path) -> Store:
    """A new, empty store at ``path``, replacing the one a previous demo run left there (anything at ``path``
    that is not a cdm store is refused, never deleted)."""
    if path.exists():
        Store.open(path).close()
        shutil.rmtree(path)
    return Store.create(path)


def plot_weights(w: np.ndarray, labels: np.ndarray, path: Path) -> None:
    """Mean weight of the digits-0-4 compartment over sampling steps, for samples labelled 0-4 vs 5-9."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    for sel, name in [(labels < 5, "became 0-4"), (labels >= 5, "became 5-9")]:
        if not sel.any():
            continue
        ax.plot(np.arange(w.shape[0]), w[:, sel, 0].mean(1), label=name)
    ax.set_xlabel("sampling step")
    ax.set_ylabel("weight of the digits-0-4 compartment")
    ax.set_ylim(-0.02, 1.02)
    ax.legend()
    fig.tight_layout()
    buf = _io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def run_demo(out: Path, *, backbone: Path, classifier: Path, per_class: int = 10, steps: int = 300,
             seed: int = 0, progress: bool = True, log=print) -> dict:
    t_all = time.perf_counter()
    bb = Backbone.from_pretrained(backbone)
    judge_net = DigitClassifier.from_pretrained(classifier)
    protected = load_source("mnist/protected")
    results: dict = {}

    # 1. the backbone
    t0 = time.perf_counter()
    gen = generate_from_store(None, bb, labels=class_labels(bb, per_class=per_class), guidance=2.0, steps=50, seed=seed,
                              progress=progress)
    images, labels = gen.images, gen.labels
    write_samples(out, "backbone", images, labels, nrow=per_class)
    results["backbone"] = {**score_samples(images, labels, judge_net, protected),
                           "seconds": round(time.perf_counter() - t0, 1)}
    log(f"backbone: accuracy {results['backbone']['accuracy']:.3f}, FID {results['backbone']['fid']:.2f}")

    # 2. compartments: add two sources, sample each, forget one
    cfg = CompartmentConfig(steps=steps, seed=seed)
    comps = {}
    with fresh_store(out / "store") as st:
        for name, spec in DEMO_SOURCES.items():
            src = load_source(spec)
            res = add_source(st, bb, src, name=name, cfg=cfg, tags=("demo",), progress=progress)
            classes = sorted(set(src.labels.tolist()))
            gen = generate_from_store(st, bb, [name], labels=np.repeat(np.asarray(classes), per_class),
                                      guidance=2.0, steps=50, seed=seed)
            imgs, lab = gen.images, gen.labels
            write_samples(out, f"compartment-{name}", imgs, lab, nrow=per_class)
            j = judge(judge_net, imgs, lab)
            comps[name] = {"source": spec, "n": len(src), "train_seconds": res.record.wall_seconds,
                           "weights_sha256": res.compartment.weights_sha256, "accuracy": round(j["accuracy"], 4)}
            log(f"compartment {name}: {len(src)} samples, {res.record.wall_seconds:.0f} s, "
                f"accuracy {j['accuracy']:.3f}")
        # compose both (Ito weights, ancestral sampler): every digit should be drawn by the compartment that knows it
        lab = np.repeat(np.arange(10), per_class)
        gen = generate_from_store(st, bb, list(DEMO_SOURCES), labels=lab, weighting="ito", guidance=2.0, steps=50,
                                  seed=seed)  # ito: the ancestral (ddpm) solver
        imgs, w = gen.images, gen.weights  # w: (steps, N, 2)
        write_samples(out, "composed", imgs, lab, nrow=per_class)
        routed = float(np.mean(w[-1].argmax(1) == (lab >= 5)))
        j = judge(judge_net, imgs, lab)
        # unconditional, as users get it: each image's class drawn from the sources' pooled class counts
        m_gen = generate_from_store(st, bb, list(DEMO_SOURCES), n=10 * per_class, weighting="ito", steps=50,
                                    seed=seed + 1)
        write_samples(out, "composed-unconditional", m_gen.images, m_gen.labels, nrow=per_class)
        m_conf = float((classify(judge_net, m_gen.images)[1] >= 0.8).mean())
        # the null-class row: no label, so no class prior; the Ito weights alone decide which source explains it
        u_gen = generate_from_store(st, bb, list(DEMO_SOURCES), n=10 * per_class, weighting="ito", steps=50,
                                    seed=seed + 1, unconditional="null")
        u_imgs, u_w = u_gen.images, u_gen.weights
        write_samples(out, "composed-null-row", u_imgs, None, nrow=per_class)
        pred, prob, _ = classify(judge_net, u_imgs)
        confident = prob >= 0.8
        plot_weights(u_w[:, confident], pred[confident], out / "weights.png")
        agree = float(np.mean(u_w[-1].argmax(1)[confident] == (pred[confident] >= 5))) if confident.any() else None
        comps["composed"] = {"accuracy": round(j["accuracy"], 4), "routed_to_owner": round(routed, 4),
                             "evals": u_gen.evals, "unconditional_confident": round(m_conf, 4),
                             "null_row_confident": round(float(confident.mean()), 4),
                             "null_row_weight_agrees": None if agree is None else round(agree, 4)}
        log(f"composed (ito): accuracy {j['accuracy']:.3f}; unconditional (class drawn from the sources' mix): "
            f"{m_conf:.1%} read confidently; null-class row: {confident.mean():.1%}, of which {agree or 0:.1%} end "
            "with most weight on the compartment of their digit")
        # credit attribution: unconditional samples along the probability-flow ODE, each source's density the
        # mixture of its classes; which compartment made each sample, read from the path alone
        t0 = time.perf_counter()
        att = attribute_samples(st, bb, list(DEMO_SOURCES), n=2 * per_class, seed=seed + 2, steps=25, probes=2)
        write_samples(out, "attribution", att.images, None, nrow=per_class)
        pred, prob, _ = classify(judge_net, att.images)
        top = np.clip(att.credit, 0, None).argmax(1)
        conf = prob >= 0.8
        results["attribution"] = {
            "n": len(top), "density": att.density, "confident": int(conf.sum()),
            "top_credit_is_digit_owner": None if not conf.any() else
            round(float(np.mean(top[conf] == (pred[conf] >= 5))), 4),
            "seconds": round(time.perf_counter() - t0, 1),
            "samples": [{"digit": int(pred[i]), "prob": round(float(prob[i]), 3),
                         "credit": [round(float(c), 3) for c in att.credit[i]],
                         "credit_se": [round(float(c), 4) for c in att.credit_se[i]],
                         "weight_path": [round(float(c), 3) for c in att.weight_path[i]]} for i in range(len(top))]}
        a = results["attribution"]
        log(f"attribution: {a['confident']} of {a['n']} samples read confidently; the top-credit source holds the "
            f"digit for {(a['top_credit_is_digit_owner'] or 0):.1%} of them")
        forgotten = forget_source(st, "digits-5-9", reason="demo: the owner withdrew consent")
        remaining = [s["id"] for s in st.sources()]
        audit = st.audit_log(limit=6)
        problems = st.verify()
    results["compartments"] = comps
    results["forget"] = {"source": "digits-5-9", "seconds": round(forgotten.seconds, 4),
                         "removed": forgotten.removed, "remaining_sources": remaining, "store_problems": problems}
    results["seconds"] = round(time.perf_counter() - t_all, 1)
    atomic_write_json(out / "results.json", results)
    atomic_write_bytes(out / "report.md", _report(results, per_class, steps, seed, audit).encode())
    return results


def _report(r: dict, per_class: int, steps: int, seed: int, audit: list[dict]) -> str:
    b = r["backbone"]
    rows = "\n".join(f"| {n} | `{c['source']}` | {c['n']} | {c['train_seconds']:.0f} | {c['accuracy']:.3f} | "
                     f"`{c['weights_sha256'][:12]}` |" for n, c in r["compartments"].items() if n != "composed")
    comp = r["compartments"]["composed"]
    audit_rows = "\n".join(f"| {a['seq']} | {a['ts'][:19]} | {a['actor']} | {a['action']} | {a['target']} |"
                           for a in audit)
    f = r["forget"]
    return f"""# cdm demo

## 1. The shipped backbone

Pretrained on public data only (the 1,000-image public slice of the embedded MNIST), then frozen.
{per_class} images per digit, DDIM 50 steps, classifier-free guidance 2, seed {seed}:

![backbone samples](backbone.png)

| metric | value |
|---|---|
| shipped classifier's accuracy vs the requested digit | {b['accuracy']:.3f} |
| mean max-probability, samples / real protected digits | {b['mean_max_prob']:.3f} / {b['real_mean_max_prob']:.3f} |
| FID vs the 4,000 protected digits (classifier features, {b['n']} samples) | {b['fid']:.2f} |

## 2. Compartments

Two protected sources, each with its own compartment (8 prompt tokens per block and class, {steps} steps);
the backbone is untouched. Samples from each compartment alone (its own classes, guidance 2):

| source | spec | samples | train s | judge accuracy | weights |
|---|---|---|---|---|---|
{rows}

![digits 0-4](compartment-digits-0-4.png) ![digits 5-9](compartment-digits-5-9.png)

## 3. Composition

Both compartments composed, `eps = w_0-4 eps_0-4 + w_5-9 eps_5-9`, w the posterior that the noisy sample came
from each source (Prop. 3.1). All ten digits asked for (ancestral sampler, 50 steps, guidance 2): a digit's prior
`lambda_i(y)` is source i's share of that digit, so each digit is drawn by the compartment that holds it
({comp['routed_to_owner']:.1%} of the samples); judge accuracy {comp['accuracy']:.3f}.

![composed samples](composed.png)

Unconditional samples, as `cdm sample --n` draws them from class-conditional compartments: each image's digit is
drawn from the sources' pooled class counts, then drawn like the rows above ({10 * per_class} samples, 50 steps, no
guidance). {comp['unconditional_confident']:.1%} are read confidently as a digit by the classifier.

![unconditional composed samples](composed-unconditional.png)

The compartments' null-class rows instead (`--unconditional null`: no label, so no class prior): the Itô density
estimator alone decides, from the sampling path, which source explains each sample (no training). The null row
stays close to the public backbone, so only {comp['null_row_confident']:.1%} are read confidently; of those,
{(comp['null_row_weight_agrees'] or 0):.1%} end with most weight on the compartment whose source holds that
digit; {comp['evals']} denoiser evaluations.

![null-row composed samples](composed-null-row.png)

The weight of the digits-0-4 compartment over the sampling steps, averaged over the confident null-row samples
by the digit they became (starts at lambda = 1/2, then each sample commits to a source):

![weights](weights.png)

## 4. Who made this image? Credit attribution

{_attribution_section(r, per_class)}

## 5. Forgetting

`digits-5-9` was forgotten in {f['seconds'] * 1000:.0f} ms (no training): removed {f['removed']}; the store now
lists {f['remaining_sources']}; consistency check: {'clean' if not f['store_problems'] else f['store_problems']}.

| seq | when (UTC) | who | action | target |
|---|---|---|---|---|
{audit_rows}

Total wall time {r['seconds']} s.
"""


def _attribution_section(r: dict, per_class: int) -> str:
    a = r.get("attribution")
    if a is None:
        return "(not run)"
    share = "-" if a["top_credit_is_digit_owner"] is None else f"{a['top_credit_is_digit_owner']:.1%}"
    rows = "\n".join(f"| {i} | {s['digit']} ({s['prob']:.2f}) | {s['credit'][0]:.2f} ± {s['credit_se'][0]:.3f} | "
                     f"{s['credit'][1]:.2f} | {s['weight_path'][0]:.2f} / {s['weight_path'][1]:.2f} |"
                     for i, s in enumerate(a["samples"][:per_class]))
    return f"""{a['n']} unconditional samples from the composition, generated along the probability-flow ODE (25
steps). Each source's density is the mixture of its classes weighted by its own class counts, so nothing tells
the sampler which source or digit to draw. The likelihood credit `C_i = L_i / sum_j L_j`, `L_i = int div(w_i
v_i) dt` along the path (Hutchinson, 2 probes; ± its standard error), says which source's compartment made the
sample; the weight path is the time-integrated weight. {a['confident']} samples are read confidently by the
classifier; for {share} of them the top-credit source is the one that holds that digit ({a['seconds']} s).

![attributed samples](attribution.png)

| sample (first row) | read as (probability) | credit digits-0-4 | credit digits-5-9 | weight path 0-4 / 5-9 |
|---|---|---|---|---|
{rows}"""
