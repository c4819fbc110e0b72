"""What an operator does to a compartment store: add a source, train the paragon, forget a source or samples.

Each operation combines the store (registry, files, audit) with training; the CLI and the HTTP service call
these functions and nothing below them.

A source's own samples are kept in the store (``work/data.<source>/source.npz``, registered as training state
of that source) so that a sample-level forget can retrain the compartment from scratch; forgetting the source
deletes them with everything else derived from it.
"""

from __future__ import annotations

import time

import numpy as np
from pathlib import Path

import torch

from .backbone import Backbone
from .compartments import Compartment, CompartmentConfig
from .data import Source, concat_sources, load_npz
from .errors import CdmError
from .store import Store, StoreError
from .training.compartment import train_compartment

__all__ = ["add_source", "compose", "train_paragon", "forget_source", "forget_samples", "load_compartment",
           "source_data", "PARAGON", "LEARNED_WEIGHTINGS", "ROUTER_CIDS", "ISOLATED_KIND", "head_cid", "load_weighting",
           "train_router_op", "train_isolated_op",
           "add_source_dp", "attribute_samples",  # privacy and attribution (cdm.privacy, cdm.attribution)
           "class_mixture_bank"]

PARAGON = "paragon"
_DATA = "source.npz"


def _data_dir(store: Store, name: str) -> Path:
    return store.work_dir(f"data.{name}", sources=[name])


def source_data(store: Store, name: str) -> Source:
    """The samples of a registered source, as kept in the store."""
    store.source(name)  # unknown source -> StoreError
    path = store.path / "work" / f"data.{name}" / _DATA
    if not path.is_file():
        raise StoreError(f"source '{name}' has no stored samples (it was added without them)")
    return load_npz(path, id=name)


def _put(store: Store, cid: str, comp: Compartment, record: dict, *, kind: str, sources: list[str],
         backbone: Backbone, actor: str | None) -> dict:
    manifest = {**record, "kind": kind}
    row = store.put_compartment(cid, comp.tensors(), manifest, kind=kind, sources=sources,
                                backbone_hash=backbone.hash, actor=actor)
    store.clear_work(cid)
    return row


def add_source(store: Store, backbone: Backbone, source: Source, *, name: str, cfg: CompartmentConfig,
               tags: tuple[str, ...] = (), actor: str | None = None, max_minutes: float | None = None,
               progress: bool = True, dp=None) -> dict:
    """Register ``source`` as ``name`` and train its compartment (continual learning: no other compartment is
    touched). Interrupted or paused runs resume when called again with the same arguments.

    ``dp``: a :class:`~cdm.privacy.DPConfig` trains with DP-SGD (:mod:`cdm.privacy`; ``cfg.batch_size`` is the
    expected Poisson batch; the manifest's ``dp`` entry holds the achieved epsilon from the accountant, delta,
    noise multiplier, clip, sample rate, steps). A budget that cannot be met is refused before anything is
    registered."""
    existing = {r["cid"] for r in store.compartments()}
    if name in existing:
        raise StoreError(f"source '{name}' already has a compartment; forget it first or choose another name")
    if len(source) == 0:
        raise CdmError(f"{source.id}: the source is empty")
    if dp is not None:
        from .privacy import calibrate

        calibrate(dp.epsilon, dp.delta_for(len(source)), cfg.batch_size / len(source), cfg.steps, dp.accountant)
    store.add_source(name, content_hash=source.content_hash, n=len(source), classes=list(source.classes),
                     tags=tags, actor=actor)
    data_path = _data_dir(store, name) / _DATA
    if not data_path.exists():
        source.to_npz(data_path)
    kwargs = dict(work_dir=store.work_dir(name, sources=[name]), max_minutes=max_minutes, progress=progress)
    if dp is None:
        comp, record = train_compartment(backbone, source, cfg, **kwargs)
    else:
        from .privacy import train_compartment_dp

        comp, record = train_compartment_dp(backbone, source, cfg, dp, **kwargs)
    record["source"]["spec"] = source.id
    record["source"]["id"] = name
    if comp is None:
        return {"finished": False, "record": record}
    row = _put(store, name, comp, record, kind="compartment", sources=[name], backbone=backbone, actor=actor)
    return {"finished": True, "record": record, "row": row}


def add_source_dp(store: Store, backbone: Backbone, source: Source, *, name: str, cfg: CompartmentConfig, dp,
                  **kwargs) -> dict:
    """:func:`add_source` with DP-SGD training: ``dp`` is a :class:`~cdm.privacy.DPConfig`."""
    return add_source(store, backbone, source, name=name, cfg=cfg, dp=dp, **kwargs)


def attribute_samples(store: Store, backbone: Backbone, names: list[str], *, n: int = 16, seed: int = 0,
                      steps: int = 25, probes: int = 2, exact: bool = False, priors: list[float] | None = None,
                      weighting: str = "ode", density: str = "auto") -> dict:
    """Generate ``n`` unconditional samples from the composition of stored compartments ``names`` along the
    probability-flow ODE and attribute each to the sources (:func:`cdm.attribution.attribute`). ``weighting``:
    ``ode`` (tracked along the path) or a learned one from the store (router | classifier | isolated). Default
    priors: proportional to source size.

    ``density``: each source's unconditional density. ``class-mixture``: its class-conditional compartment's
    classes weighted by the source's own class counts (:class:`~cdm.composition.ClassMixtureBank`; needs
    class-conditional compartments, labelled sources and the ``ode`` weighting, as learned heads score sources,
    not (source, class) pairs); ``prompt-row``: the compartment's unconditional prompts; ``auto``: the class
    mixture where it applies. Returns the attribution dict plus ``images`` (uint8), ``names`` and ``density``."""
    from .attribution import attribute
    from .composition import CompartmentBank

    if not names:
        raise CdmError("no sources to attribute to")
    if density not in DENSITIES:
        raise CdmError(f"unknown density {density!r}; known: {', '.join(DENSITIES)}")
    comps = [load_compartment(store, backbone, nm) for nm in names]
    if priors is None:
        priors = [float(store.source(nm)["n"]) for nm in names]
    w = None if weighting == "ode" else load_weighting(store, backbone, names, weighting)
    bank, row_priors = CompartmentBank(backbone, comps), list(priors)
    if density != "prompt-row":
        try:
            if w is not None:
                raise CdmError(f"no class mixture: the {weighting} weighting scores sources, not (source, class) "
                               "pairs")
            bank = class_mixture_bank(store, backbone, names, comps)
            row_priors, density = bank.priors(priors), "class-mixture"
        except CdmError:
            if density == "class-mixture":
                raise
            density = "prompt-row"
    m = backbone.codec.model_size
    noise = torch.randn((n, backbone.config.in_chans, m, m), generator=torch.Generator().manual_seed(seed))
    out = attribute(bank, noise, schedule=backbone.schedule, priors=row_priors, weighting=w,
                    steps=steps, probes=probes, exact=exact, seed=seed)
    out["images"] = backbone.codec.decode(torch.as_tensor(out["x0"]))
    out["names"] = list(names)
    out["priors"] = list(priors)
    out["density"] = density
    return out


DENSITIES = ("auto", "class-mixture", "prompt-row")  # attribute_samples(density=...)


def class_mixture_bank(store: Store, backbone: Backbone, names: list[str], comps: list[Compartment] | None = None):
    """Stored sources ``names`` as a :class:`~cdm.composition.ClassMixtureBank`: each class-conditional
    compartment's classes weighted by its source's stored class counts. ``comps``: the loaded compartments, if
    the caller has them. CdmError when a compartment is unconditional or a source's labels are missing."""
    from .composition import ClassMixtureBank, CompartmentBank

    comps = comps if comps is not None else [load_compartment(store, backbone, nm) for nm in names]
    if not all(c.config.conditional for c in comps):
        raise CdmError("no class mixture: the compartments are not class-conditional")
    counts = _class_counts(store, names, comps)
    if counts is None or (counts.sum(1) == 0).any():
        raise CdmError("no class mixture: a source's labels are missing")
    return ClassMixtureBank(CompartmentBank(backbone, comps), counts)


def train_paragon(store: Store, backbone: Backbone, *, cfg: CompartmentConfig, sources: list[str] | None = None,
                  actor: str | None = None, max_minutes: float | None = None, progress: bool = True) -> dict:
    """The paper's "no split" reference: one compartment with the same prompt budget trained on the union."""
    names = sources or [s["id"] for s in store.sources()]
    if not names:
        raise StoreError("the store has no sources to train a paragon on")
    union = concat_sources([source_data(store, n) for n in names], id="+".join(names))
    comp, record = train_compartment(backbone, union, cfg, work_dir=store.work_dir(PARAGON, sources=names),
                                     max_minutes=max_minutes, progress=progress)
    record["source"]["id"] = PARAGON
    record["source"]["sources"] = names
    if comp is None:
        return {"finished": False, "record": record}
    row = _put(store, PARAGON, comp, record, kind="paragon", sources=names, backbone=backbone, actor=actor)
    return {"finished": True, "record": record, "row": row}


def load_compartment(store: Store, backbone: Backbone, cid: str) -> Compartment:
    """A stored compartment, checked against this backbone and its hashes."""
    tensors, manifest = store.load_compartment(cid, backbone_hash=backbone.hash)
    comp = Compartment.for_backbone(backbone, CompartmentConfig.from_dict(manifest["config"]))
    comp.load_tensors(tensors, origin=f"compartment '{cid}'")
    return comp.eval().requires_grad_(False)


def forget_source(store: Store, name: str, *, reason: str = "", actor: str | None = None) -> dict:
    """Remove the source, its compartment, its stored samples and every joint compartment trained on it. No
    training happens."""
    t0 = time.perf_counter()
    out = store.forget_source(name, reason=reason, actor=actor)
    out["seconds"] = time.perf_counter() - t0
    return out


def forget_samples(store: Store, backbone: Backbone, name: str, sample_ids: list[str], *, reason: str = "",
                   actor: str | None = None, progress: bool = True) -> dict:
    """Remove samples from a source: the stored samples are rewritten without them and the compartment is
    retrained from scratch with its recorded config and seed, so the result is bit-identical to a compartment
    trained on the reduced source directly. Joint compartments (paragon, router) that saw the source are
    dropped (they must be retrained; the audit record says so)."""
    t0 = time.perf_counter()
    if not sample_ids:
        raise CdmError("no sample ids given")
    row = store.compartment(name)
    cfg = CompartmentConfig.from_dict(row["manifest"]["config"])
    spec = row["manifest"].get("source", {}).get("spec", name)
    full = source_data(store, name)
    reduced = full.without(sample_ids, id=name)  # unknown or ambiguous ids -> DataError, nothing changed yet
    removed_n = len(full) - len(reduced)
    # 1. nothing trained on the samples may survive: the source's compartment and joint ones go first
    dropped = [r for r in store.compartments() if name in r["sources"]]
    for r in dropped:
        store.remove_compartment(r["cid"], reason=f"forget {removed_n} sample(s) of '{name}'", actor=actor)
    # 2. the stored samples lose them
    reduced.to_npz(_data_dir(store, name) / _DATA)
    store.update_source_content(name, content_hash=reduced.content_hash, n=len(reduced), actor=actor)
    # 3. retrain from scratch (same config and seed)
    with torch.random.fork_rng():
        comp, record = train_compartment(backbone, reduced, cfg, work_dir=store.work_dir(name, sources=[name]),
                                         progress=progress)
    record["source"]["spec"] = spec
    record["source"]["id"] = name
    new_row = _put(store, name, comp, record, kind="compartment", sources=[name], backbone=backbone, actor=actor)
    seconds = time.perf_counter() - t0
    store.record("forget-samples", name, {
        "reason": reason, "n_removed": removed_n, "seconds": round(seconds, 2),
        "retrain": [{"cid": r["cid"], "kind": r["kind"]} for r in dropped if r["cid"] != name],
    }, before=row["weights_sha256"], after=new_row["weights_sha256"], actor=actor)
    return {"source": name, "n_removed": removed_n, "seconds": seconds, "before": row["weights_sha256"],
            "after": new_row["weights_sha256"], "dropped": [r["cid"] for r in dropped if r["cid"] != name]}


def compose(store: Store, backbone: Backbone, names: list[str], *, weighting: str = "ito", threshold: float = 0.0,
            priors: list[float] | None = None, seed: int = 0, class_conditional_priors: bool = True):
    """A composed denoiser over stored compartments (default priors: proportional to source size).

    ``weighting``: ``ito``, ``naive``, ``single``, or a learned one read from the store: ``router`` (stored cid
    "router"), ``classifier`` (cid "noisy-classifier"), both trained on these sources or a superset (their
    logits for the requested sources are used, in order), or ``isolated`` (each source's own head
    "<source>.head"). Missing learned weights: a :class:`CdmError` naming the ``cdm train-router`` command.
    Class-conditional compartments get per-class priors ``lambda_i(y)`` proportional to source i's samples of
    class y (``class_conditional_priors``); ``priors`` apply to the unconditional (null-class) branch."""
    from .composition import WEIGHTINGS, CompartmentBank, ComposedDenoiser

    if weighting not in WEIGHTINGS or weighting == "oracle":
        known = [k for k in WEIGHTINGS if k != "oracle"]
        raise CdmError(f"unknown weighting {weighting!r}; known: {', '.join(known)}")
    if not names:
        raise CdmError("no sources to compose")
    comps = [load_compartment(store, backbone, n) for n in names]
    if priors is None:
        priors = [float(store.source(n)["n"]) for n in names]
    class_priors = _class_counts(store, names, comps) if class_conditional_priors else None
    if weighting == "ito":
        w = WEIGHTINGS["ito"](backbone.schedule)
    elif weighting == "single":
        w = WEIGHTINGS["single"](torch.Generator().manual_seed(seed))
    elif weighting in LEARNED_WEIGHTINGS:
        w = load_weighting(store, backbone, names, weighting)
    else:
        w = WEIGHTINGS[weighting]()
    return ComposedDenoiser(CompartmentBank(backbone, comps), w, priors=priors, class_priors=class_priors,
                            threshold=threshold)


def _class_counts(store: Store, names: list[str], comps: list[Compartment]) -> np.ndarray | None:
    """(sources, classes) sample counts from the stored samples, for lambda_i(y) = n_i(y) / sum_j n_j(y): a
    source that holds no sample of class y gets no weight for y (its class-y prompts were never trained, so
    they are only the public backbone). None when the compartments are unconditional or data is missing."""
    if not comps or not all(c.config.conditional for c in comps):
        return None
    counts = np.zeros((len(names), comps[0].num_classes), dtype=np.float64)
    for i, n in enumerate(names):
        key = (store.source(n)["content_hash"], counts.shape[1])  # covers images and labels
        if key not in _COUNTS:
            try:
                labels = source_data(store, n).labels
            except StoreError:
                return None
            if labels is None:
                return None
            _COUNTS[key] = np.bincount(labels, minlength=counts.shape[1])[: counts.shape[1]]
        counts[i] = _COUNTS[key]
    return counts


# Class counts by (source content hash, classes): compose() runs per service request and must not reread every
# source's samples each time. Keyed by content, so a forgotten-then-readded or sample-forgotten source misses.
_COUNTS: dict[tuple[str, int], np.ndarray] = {}


# ----------------------------------------------------------------------------------------------- learned weightings
# Joint weightings (one per store, trained on a list of sources; forgetting any of them drops it) and isolated
# heads (one per source, stored with ``sources=[source]``, so they live and die with its compartment).

ROUTER_CIDS = {"router": "router", "classifier": "noisy-classifier"}  # kind -> cid
ISOLATED_KIND = "isolated-head"
LEARNED_WEIGHTINGS = ("router", "classifier", "isolated")


def head_cid(name: str) -> str:
    """The cid of source ``name``'s isolated head."""
    return f"{name}.head"


def _head_config(cfg, overrides: dict):
    from .composition.heads import HeadConfig

    base = cfg or HeadConfig()
    return HeadConfig.from_dict({**base.to_dict(), **overrides}) if overrides else base


def _compartment_names(store: Store) -> list[str]:
    return [r["cid"] for r in store.compartments(kind="compartment")]


def train_router_op(store: Store, backbone: Backbone, names: list[str] | None = None, *, kind: str = "router",
                    cfg=None, actor: str | None = None, progress: bool = True, **overrides) -> dict:
    """Train a joint weighting on the stored sources ``names`` (default: every source with a compartment) and
    store it: ``kind="router"`` (heads on the compartments' mid tokens; cid "router") or ``"classifier"`` (a
    noisy classifier; cid "noisy-classifier"), with ``sources=names``, replacing any previous one of that kind.
    ``cfg`` is a :class:`~cdm.composition.HeadConfig`; keywords override its fields. Returns
    ``{"row", "record"}``."""
    from .composition.heads import state_tensors, train_noisy_classifier, train_router

    if kind not in ROUTER_CIDS:
        raise CdmError(f"unknown joint weighting kind {kind!r}; known: {', '.join(ROUTER_CIDS)} "
                       "(isolated heads: train_isolated_op)")
    cfg = _head_config(cfg, overrides)
    names = list(dict.fromkeys(names or _compartment_names(store)))
    if len(names) < 2:
        raise CdmError(f"a {kind} needs at least two sources (got {', '.join(names) or 'none'})")
    sources = [source_data(store, n) for n in names]
    comp_rows = {n: store.compartment(n) for n in names} if kind == "router" else {}
    if kind == "router":
        comps = [load_compartment(store, backbone, n) for n in names]
        module, record = train_router(backbone, comps, sources, cfg=cfg, progress=progress)
    else:
        module, record = train_noisy_classifier(backbone.schedule, backbone.codec, sources, cfg=cfg,
                                                progress=progress)
    for entry, name in zip(record["sources_seen"], names, strict=True):
        entry["name"] = name
        if name in comp_rows:
            entry["compartment_sha256"] = comp_rows[name]["weights_sha256"]
    cid = ROUTER_CIDS[kind]
    row = store.put_compartment(cid, state_tensors(module), record, kind=kind, sources=names,
                                backbone_hash=backbone.hash, actor=actor)
    return {"row": row, "record": record}


def train_isolated_op(store: Store, backbone: Backbone, name: str, *, core: Source | None = None, cfg=None,
                      actor: str | None = None, progress: bool = True, **overrides) -> dict:
    """Train source ``name``'s isolated density-ratio head (its data against the public ``core``, default the
    public MNIST slice, through its own compartment only) and store it as cid ``"<name>.head"``, kind
    "isolated-head", ``sources=[name]``: it belongs to that source (forgetting the source removes it) and no
    other source's head is touched. Returns ``{"row", "record"}``."""
    from .composition.heads import state_tensors, train_isolated_head
    from .data import public_protected

    cfg = _head_config(cfg, overrides)
    comp_row = store.compartment(name)
    if comp_row["kind"] != "compartment":
        raise CdmError(f"'{name}' is a {comp_row['kind']}, not a source's compartment")
    comp = load_compartment(store, backbone, name)
    core = core if core is not None else public_protected()[0]
    head, record = train_isolated_head(backbone, comp, source_data(store, name), core, cfg=cfg, progress=progress)
    record["sources_seen"][0].update(name=name, compartment_sha256=comp_row["weights_sha256"])
    row = store.put_compartment(head_cid(name), state_tensors(head), record, kind=ISOLATED_KIND, sources=[name],
                                backbone_hash=backbone.hash, actor=actor)
    return {"row": row, "record": record}


def _check_seen(manifest: dict, names: list[str], store: Store, what: str, compartments: bool) -> None:
    """The stored weighting saw the current content of each source (and, for heads, its current compartment)."""
    seen = {e.get("name"): e for e in manifest.get("sources_seen", [])}
    for n in names:
        e = seen.get(n, {})
        if e.get("content_hash") != store.source(n)["content_hash"] or (
                compartments and e.get("compartment_sha256") != store.compartment(n)["weights_sha256"]):
            raise CdmError(f"the {what} was trained on another version of source '{n}' or its compartment: "
                           f"retrain it (`cdm train-router --store {store.path} ...`)")


def load_weighting(store: Store, backbone: Backbone, names: list[str], weighting: str):
    """The learned weighting ``weighting`` (router | classifier | isolated) for sources ``names``, in order."""
    from .composition.heads import (ClassifierWeighting, HeadBank, IsolatedWeighting, RouterWeighting, load_head,
                                    load_head_bank, load_noisy_classifier)

    listed, spec = ", ".join(names), ",".join(names)
    if weighting in ROUTER_CIDS:
        cid, what = ROUTER_CIDS[weighting], ("router" if weighting == "router" else "noisy classifier")
        rows = {r["cid"]: r for r in store.compartments(kind=weighting)}
        row = rows.get(cid)
        if row is None or not set(names) <= set(row["sources"]):
            have = f" (the stored {what} covers {', '.join(row['sources'])})" if row is not None else ""
            flag = "" if weighting == "router" else " --kind classifier"
            raise CdmError(f"no {what} covers sources {listed}{have}: run "
                           f"`cdm train-router --store {store.path} --sources {spec}{flag}`")
        tensors, manifest = store.load_compartment(cid, backbone_hash=backbone.hash)
        _check_seen(manifest, names, store, what, compartments=weighting == "router")
        columns = [row["sources"].index(n) for n in names]
        if weighting == "router":
            return RouterWeighting(load_head_bank(tensors, manifest["arch"], f"router '{cid}'").select(columns))
        return ClassifierWeighting(load_noisy_classifier(tensors, manifest["arch"], f"noisy classifier '{cid}'"),
                                   columns)
    if weighting != "isolated":
        raise CdmError(f"unknown learned weighting {weighting!r}; known: {', '.join(LEARNED_WEIGHTINGS)}")
    have = {r["cid"] for r in store.compartments(kind=ISOLATED_KIND)}
    missing = [n for n in names if head_cid(n) not in have]
    if missing:
        raise CdmError(f"no isolated head for sources {', '.join(missing)}: run "
                       f"`cdm train-router --store {store.path} --sources {','.join(missing)} --kind isolated`")
    heads, cores = [], set()
    for n in names:
        tensors, manifest = store.load_compartment(head_cid(n), backbone_hash=backbone.hash)
        _check_seen(manifest, [n], store, f"isolated head of '{n}'", compartments=True)
        cores.add(manifest.get("core", {}).get("content_hash"))
        heads.append(load_head(tensors, manifest["arch"], f"isolated head '{head_cid(n)}'"))
    if len(cores) != 1:
        raise CdmError(f"the isolated heads of {listed} were trained against different core sets; their ratios "
                       "do not compose: retrain them against one core")
    return IsolatedWeighting(HeadBank(heads))
