"""What an operator does to a compartment store: add a source, train the paragon, forget a source or samples.

Each operation combines the store (registry, files, audit) with training; the CLI and the HTTP service call
these functions and nothing below them.

A source's own samples are kept in the store (``work/data.<source>/source.npz``, registered as training state
of that source) so that a sample-level forget can retrain the compartment from scratch; forgetting the source
deletes them with everything else derived from it.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .backbone import Backbone
from .compartments import Compartment, CompartmentConfig
from .data import Source, load_npz
from .errors import CdmError
from .store import Store, StoreError
from .training.compartment import concat_sources, train_compartment

__all__ = ["add_source", "compose", "train_paragon", "forget_source", "forget_samples", "load_compartment", "source_data",
           "PARAGON"]

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
               progress: bool = True) -> dict:
    """Register ``source`` as ``name`` and train its compartment (continual learning: no other compartment is
    touched). Interrupted or paused runs resume when called again with the same arguments."""
    existing = {r["cid"] for r in store.compartments()}
    if name in existing:
        raise StoreError(f"source '{name}' already has a compartment; forget it first or choose another name")
    if len(source) == 0:
        raise CdmError(f"{source.id}: the source is empty")
    store.add_source(name, content_hash=source.content_hash, n=len(source), classes=list(source.classes),
                     tags=tags, actor=actor)
    data_path = _data_dir(store, name) / _DATA
    if not data_path.exists():
        source.to_npz(data_path)
    comp, record = train_compartment(backbone, source, cfg, work_dir=store.work_dir(name, sources=[name]),
                                     max_minutes=max_minutes, progress=progress)
    record["source"]["spec"] = source.id
    record["source"]["id"] = name
    if comp is None:
        return {"finished": False, "record": record}
    row = _put(store, name, comp, record, kind="compartment", sources=[name], backbone=backbone, actor=actor)
    return {"finished": True, "record": record, "row": row}


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
            priors: list[float] | None = None, seed: int = 0):
    """A composed denoiser over stored compartments (default priors: proportional to source size)."""
    from .composition import WEIGHTINGS, CompartmentBank, ComposedDenoiser

    if weighting not in WEIGHTINGS or weighting == "oracle":
        known = [k for k in WEIGHTINGS if k != "oracle"]
        raise CdmError(f"unknown weighting {weighting!r}; known: {', '.join(known)}")
    if not names:
        raise CdmError("no sources to compose")
    comps = [load_compartment(store, backbone, n) for n in names]
    if priors is None:
        priors = [float(store.source(n)["n"]) for n in names]
    if weighting == "ito":
        w = WEIGHTINGS["ito"](backbone.schedule)
    elif weighting == "single":
        w = WEIGHTINGS["single"](torch.Generator().manual_seed(seed))
    else:
        w = WEIGHTINGS[weighting]()
    return ComposedDenoiser(CompartmentBank(backbone, comps), w, priors=priors, threshold=threshold)
