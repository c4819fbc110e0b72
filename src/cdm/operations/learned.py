"""Learned weightings in a store: train them (router, noisy classifier, isolated heads), load them for a
composition, and say which weightings a set of stored sources can run.

Joint weightings (one per store, trained on a list of sources; forgetting any of them drops it) and isolated
heads (one per source, stored with ``sources=[source]``, so they live and die with its compartment).
"""

from __future__ import annotations

from ..backbone import Backbone
from ..data import Source
from ..errors import CdmError
from ..composition.registry import REGISTRY, names
from ..store import Store
from .results import HeadsTrained, StoredCompartment
from .sources import load_compartment, model_inputs, require_store_backbone, source_data, text_inputs

__all__ = ["ISOLATED_KIND", "LEARNED_WEIGHTINGS", "ROUTER_CIDS", "head_cid", "load_weighting", "runnable_weightings",
           "train_heads", "train_isolated_op", "train_router_op"]

ROUTER_CIDS = {"router": "router", "classifier": "noisy-classifier"}  # kind -> cid
ISOLATED_KIND = "isolated-head"
LEARNED_WEIGHTINGS = tuple(k for k in names() if REGISTRY[k].heads)  # ("router", "classifier", "isolated")


def head_cid(name: str) -> str:
    """The cid of source ``name``'s isolated head."""
    return f"{name}.head"


def _head_config(cfg, overrides: dict):
    from ..composition import HeadConfig

    base = cfg or HeadConfig()
    return HeadConfig.from_dict({**base.to_dict(), **overrides}) if overrides else base


def _compartment_names(store: Store) -> list[str]:
    return [r["cid"] for r in store.compartments(kind="compartment")]


def train_router_op(store: Store, backbone: Backbone, names: list[str] | None = None, *, kind: str = "router",
                    cfg=None, actor: str | None = None, progress: bool = True, **overrides) -> HeadsTrained:
    """Train a joint weighting on the stored sources ``names`` (default: every source with a compartment) and
    store it: ``kind="router"`` (heads on the compartments' mid tokens; cid "router") or ``"classifier"`` (a
    noisy classifier; cid "noisy-classifier"), with ``sources=names``, replacing any previous one of that kind.
    ``cfg`` is a :class:`~cdm.composition.HeadConfig`; keywords override its fields."""
    from ..composition import train_noisy_classifier, train_router
    from ..composition.heads import state_tensors

    if kind not in ROUTER_CIDS:
        raise CdmError(f"unknown joint weighting kind {kind!r}; known: {', '.join(ROUTER_CIDS)} "
                       "(isolated heads: train_isolated_op)")
    require_store_backbone(store, backbone)
    cfg = _head_config(cfg, overrides)
    names = list(dict.fromkeys(names or _compartment_names(store)))
    if len(names) < 2:
        raise CdmError(f"a {kind} needs at least two sources (got {', '.join(names) or 'none'})")
    sources = [source_data(store, n) for n in names]
    inputs = [model_inputs(store, backbone, n, s) for n, s in zip(names, sources, strict=True)]
    comp_rows = {n: store.compartment(n) for n in names} if kind == "router" else {}
    if kind == "router":
        comps = [load_compartment(store, backbone, n) for n in names]
        texts = None
        if comps[0].config.text:
            enc = comps[0].config.text_encoder
            texts = [text_inputs(store, n, enc, s) for n, s in zip(names, sources, strict=True)]
        module, record = train_router(backbone, comps, sources, cfg=cfg, progress=progress, inputs=inputs,
                                      texts=texts)
    else:
        module, record = train_noisy_classifier(backbone.schedule, backbone.codec, sources, cfg=cfg,
                                                progress=progress, inputs=inputs, device=backbone.device)
    for entry, name in zip(record["sources_seen"], names, strict=True):
        entry["name"] = name
        if name in comp_rows:
            entry["compartment_sha256"] = comp_rows[name]["weights_sha256"]
    cid = ROUTER_CIDS[kind]
    row = store.put_compartment(cid, state_tensors(module), record, kind=kind, sources=names,
                                backbone_hash=backbone.hash, actor=actor)
    return HeadsTrained(StoredCompartment.from_row(row), record)


def train_isolated_op(store: Store, backbone: Backbone, name: str, *, core: Source | None = None, cfg=None,
                      actor: str | None = None, progress: bool = True, **overrides) -> HeadsTrained:
    """Train source ``name``'s isolated density-ratio head (its data against the public ``core``, default the
    public MNIST slice, through its own compartment only) and store it as cid ``"<name>.head"``, kind
    "isolated-head", ``sources=[name]``: it belongs to that source (forgetting the source removes it) and no
    other source's head is touched."""
    from ..composition import train_isolated_head
    from ..composition.heads import state_tensors
    from ..data import public_protected

    require_store_backbone(store, backbone)
    cfg = _head_config(cfg, overrides)
    comp_row = store.compartment(name)
    if comp_row["kind"] != "compartment":
        raise CdmError(f"'{name}' is a {comp_row['kind']}, not a source's compartment")
    comp = load_compartment(store, backbone, name)
    if core is None:
        core = public_protected()[0]
        if core.spec != backbone.codec.spec:
            raise CdmError(f"an isolated head needs public core data of this backbone's images ({backbone.codec.spec}"
                           "); the default (the public digits) is not: pass core (`cdm train-router --kind isolated "
                           "--core SPEC`)")
    if core.spec != backbone.codec.spec:
        from ..data import fit

        core = fit(core, backbone.codec.spec)
    data = source_data(store, name)
    head, record = train_isolated_head(backbone, comp, data, core, cfg=cfg, progress=progress,
                                       inputs=model_inputs(store, backbone, name, data))
    record["sources_seen"][0].update(name=name, compartment_sha256=comp_row["weights_sha256"])
    row = store.put_compartment(head_cid(name), state_tensors(head), record, kind=ISOLATED_KIND, sources=[name],
                                backbone_hash=backbone.hash, actor=actor)
    return HeadsTrained(StoredCompartment.from_row(row), record)


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
    """The learned weighting ``weighting`` (router | classifier | isolated) for sources ``names``, in order, its
    heads on the backbone's device."""
    from ..composition import ClassifierWeighting, HeadBank, IsolatedWeighting, RouterWeighting
    from ..composition.heads import load_head, load_head_bank, load_noisy_classifier

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
            bank = load_head_bank(tensors, manifest["arch"], f"router '{cid}'").select(columns)
            return RouterWeighting(bank.to(backbone.device))
        model = load_noisy_classifier(tensors, manifest["arch"], f"noisy classifier '{cid}'")
        return ClassifierWeighting(model.to(backbone.device), columns)
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
    return IsolatedWeighting(HeadBank(heads).to(backbone.device))


def runnable_weightings(store: Store, sources: list[str]) -> list[str]:
    """The weightings (registry order) a composition of the stored ``sources`` can run now: those that need no
    heads, and learned ones whose heads are stored, cover every source and saw its current data and
    compartment (what :func:`load_weighting` would accept). None for no source."""
    if not sources:
        return []
    out = []
    for name in names():
        spec = REGISTRY[name]
        if spec.heads is None:
            out.append(name)
        elif len(sources) >= 2:
            try:
                _check_available(store, sources, name)
            except CdmError:
                continue
            out.append(name)
    return out


def _check_available(store: Store, sources: list[str], weighting: str) -> None:
    """What :func:`load_weighting` checks, without loading tensors."""
    if weighting in ROUTER_CIDS:
        row = {r["cid"]: r for r in store.compartments(kind=weighting)}.get(ROUTER_CIDS[weighting])
        if row is None or not set(sources) <= set(row["sources"]):
            raise CdmError(f"no {weighting} covers {', '.join(sources)}")
        _check_seen(store.compartment(row["cid"])["manifest"], sources, store, weighting,
                    compartments=weighting == "router")
        return
    have = {r["cid"] for r in store.compartments(kind=ISOLATED_KIND)}
    for n in sources:
        if head_cid(n) not in have:
            raise CdmError(f"no isolated head for {n}")
        _check_seen(store.compartment(head_cid(n))["manifest"], [n], store, "isolated head", compartments=True)


def train_heads(store: Store, backbone: Backbone, names: list[str] | None, kind: str, *, only_missing: bool = False,
                cfg=None, core: Source | None = None, actor: str | None = None, progress: bool = True,
                **overrides) -> list[HeadsTrained]:
    """Train the heads a learned weighting needs (a registry entry's ``heads``): the joint ``router`` or
    ``classifier`` over ``names`` (default: every source with a compartment), or each source's ``isolated``
    head (against the public ``core``; see :func:`train_isolated_op`). ``only_missing``: skip heads already
    stored (a resumed benchmark)."""
    kinds = sorted({s.heads for s in REGISTRY.values() if s.heads})
    if kind not in kinds:
        raise CdmError(f"unknown kind of heads {kind!r}; known: {', '.join(kinds)}")
    names = list(dict.fromkeys(names or _compartment_names(store)))
    have = {r["cid"] for r in store.compartments()}
    kw = dict(cfg=cfg, actor=actor, progress=progress, **overrides)
    if kind == "isolated":
        return [train_isolated_op(store, backbone, n, core=core, **kw) for n in names
                if not (only_missing and head_cid(n) in have)]
    if only_missing and ROUTER_CIDS[kind] in have:
        return []
    return [train_router_op(store, backbone, names, kind=kind, **kw)]
