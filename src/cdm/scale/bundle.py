"""Compartments trained where the data lives: a **bundle** is one compartment, trained on its owner's machine with no
store (``cdm train-compartment``), that a store imports without ever seeing the data (``cdm import``).

A bundle directory holds two files, written atomically (a temporary sibling directory renamed into place)::

    BUNDLE/prompts.safetensors   the compartment's tensors
    BUNDLE/manifest.json         format, version; weights_sha256 (of prompts.safetensors) and each tensor's shape
                                 and dtype; backbone_hash (and ref); config, seed; source: spec, content_hash, n,
                                 classes, class_counts, sample_hashes (sorted); dp (the accounting of a DP
                                 compartment, or null); training (the full training record); created_at, command

Import checks, before anything is written, and refuses with a specific error: the format and version; the
weights file against ``weights_sha256`` (a tampered or damaged file); that it is safetensors (never a pickle);
the backbone hash against the store's; the config (a valid CompartmentConfig, the one the record names, the
record finished); every tensor's name and shape against what that config needs on this backbone, and finite
values; the source description (sample hashes: n distinct sha256 digests; class counts adding up to n; labels
within the backbone's classes). The store then registers the source as *imported* (``data_held`` false: no
samples file), so ``cdm forget NAME --sample`` says what the owner must do, and the audit log gets an ``import``
record (``reimport`` true when a newer bundle replaces an imported source, with how many samples it dropped and
added).
"""

from __future__ import annotations

import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch

from ..backbone import Backbone
from ..compartments import Compartment, CompartmentConfig
from ..data import Source
from ..errors import CdmError, WeightsError
from ..io import atomic_write_json, file_sha256, load_state_dict, read_json, save_state_dict
from ..operations.results import StoredCompartment
from ..store import PROMPTS_NAME, Store, StoreError, check_source_name
from ..training.record import TrainingRecord

__all__ = ["FORMAT", "MANIFEST", "VERSION", "Bundle", "BundleError", "Imported", "check_importable", "import_bundle",
           "read_bundle", "write_bundle"]

FORMAT = "cdm-compartment-bundle"
VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = PROMPTS_NAME
_HEX64 = re.compile(r"[0-9a-f]{64}")
_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}


class BundleError(CdmError):
    """A bundle that cannot be imported (the message says why)."""


@dataclass
class Bundle:
    """A bundle read and checked for integrity (:func:`read_bundle`); what still depends on a store (the
    backbone) is checked by :func:`import_bundle`."""

    path: Path
    manifest: dict
    manifest_sha256: str
    tensors: dict[str, torch.Tensor]
    config: CompartmentConfig
    record: TrainingRecord

    @property
    def backbone_hash(self) -> str:
        return self.manifest["backbone_hash"]

    @property
    def source(self) -> dict:
        return self.manifest["source"]


@dataclass(frozen=True)
class Imported:
    compartment: StoredCompartment
    reimport: bool
    n_removed: int  # sample hashes of the previous import that the new bundle does not have (re-import)
    n_added: int


def _class_counts(source: Source) -> dict[str, int] | None:
    return source.class_counts() if source.labels is not None else None


def write_bundle(out: str | os.PathLike, backbone: Backbone, source: Source, tensors: dict[str, torch.Tensor],
                 record: TrainingRecord, *, command: str | None = None) -> dict:
    """Write a bundle of a compartment trained on ``source`` (``tensors``, ``record`` as
    :func:`~cdm.operations.sources.train_source` returned them) to the new directory ``out``, atomically; returns
    its manifest. ``out`` must not exist or be an empty directory."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BundleError(f"--out {out}: exists and is not an empty directory; pick a new one")
    if not record.finished:
        raise BundleError("the compartment's training did not finish: nothing to bundle")
    if record.backbone_hash != backbone.hash or record.source.get("content_hash") != source.content_hash:
        raise BundleError("the training record is not of this backbone and source")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        save_state_dict(tmp / WEIGHTS, tensors)
        rec = record.to_dict()
        manifest = {
            "format": FORMAT, "version": VERSION,
            "weights_file": WEIGHTS, "weights_sha256": file_sha256(tmp / WEIGHTS),
            "tensors": {k: {"shape": list(v.shape), "dtype": _DTYPES.get(v.dtype, str(v.dtype))}
                        for k, v in sorted(tensors.items())},
            "backbone_hash": backbone.hash, "backbone_ref": backbone.ref,
            "config": rec["config"], "seed": rec["seed"],
            "source": {"spec": source.id, "content_hash": source.content_hash, "n": len(source),
                       "classes": list(source.classes), "class_counts": _class_counts(source),
                       "captioned": source.captioned, "sample_hashes": sorted(source.sample_hashes)},
            "dp": rec.get("dp"),
            "training": rec,
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "command": command,
        }
        atomic_write_json(tmp / MANIFEST, manifest)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _need(cond: bool, what: str) -> None:
    if not cond:
        raise BundleError(what)


def read_bundle(path: str | os.PathLike) -> Bundle:
    """Read a bundle and check what needs no store: format, the weights' sha256, safetensors, the config and the
    record, each tensor's shape and dtype against the manifest, finite values, the source description."""
    path = Path(path)
    _need(path.is_dir(), f"{path}: no such bundle directory (`cdm train-compartment ... --out BUNDLE` makes one)")
    _need((path / MANIFEST).is_file(), f"{path}: not a compartment bundle (no {MANIFEST})")
    try:
        m = read_json(path / MANIFEST)
    except WeightsError as e:
        raise BundleError(f"bundle {path}: {e}") from None
    where = f"bundle {path}"
    _need(m.get("format") == FORMAT, f"{where}: not a compartment bundle (format {m.get('format')!r})")
    _need(m.get("version") == VERSION, f"{where}: bundle version {m.get('version')!r}; this cdm reads version "
          f"{VERSION}")
    _need(m.get("weights_file") == WEIGHTS, f"{where}: weights_file must be {WEIGHTS}")
    weights = path / WEIGHTS
    _need(weights.is_file(), f"{where}: {WEIGHTS} is missing")
    want = m.get("weights_sha256")
    _need(isinstance(want, str) and bool(_HEX64.fullmatch(want)), f"{where}: manifest has no valid weights_sha256")
    actual = file_sha256(weights)
    _need(actual == want, f"{where}: {WEIGHTS} does not match the manifest's weights_sha256 (file {actual[:12]}, "
          f"manifest {want[:12]}): damaged or altered; refusing it")
    try:
        tensors = load_state_dict(weights)  # refuses a pickle
    except WeightsError as e:
        raise BundleError(f"{where}: {e}") from None
    declared = m.get("tensors")
    _need(isinstance(declared, dict) and set(declared) == set(tensors),
          f"{where}: the manifest's tensors {sorted(declared or {})} are not the file's {sorted(tensors)}")
    for k, t in tensors.items():
        _need(isinstance(declared[k], dict), f"{where}: the manifest's entry for tensor {k} is not an object")
        _need(declared[k].get("shape") == list(t.shape) and declared[k].get("dtype") == _DTYPES.get(t.dtype),
              f"{where}: tensor {k} is {list(t.shape)} {t.dtype}, the manifest says {declared[k]}")
        _need(t.is_floating_point() and bool(torch.isfinite(t).all()), f"{where}: tensor {k} has non-finite values")
    try:
        cfg = CompartmentConfig.from_dict(m.get("config"))
    except (ValueError, TypeError) as e:
        raise BundleError(f"{where}: invalid compartment config ({e})") from None
    training = m.get("training")
    _need(isinstance(training, dict), f"{where}: no training record")
    try:
        record = TrainingRecord.from_dict(training)
    except TypeError as e:
        raise BundleError(f"{where}: invalid training record ({e})") from None
    _need(isinstance(record.source, dict) and isinstance(record.config, dict) and isinstance(record.machine, dict)
          and isinstance(record.steps_done, int), f"{where}: invalid training record")
    _need(record.config == m["config"] and record.seed == m.get("seed") == cfg.seed,
          f"{where}: the training record's config or seed is not the manifest's")
    _need(record.finished and record.steps_done == cfg.steps, f"{where}: its training did not finish")
    _need(record.backbone_hash == m.get("backbone_hash") and isinstance(m.get("backbone_hash"), str)
          and bool(_HEX64.fullmatch(m["backbone_hash"])), f"{where}: backbone hash missing or not the record's")
    _need((record.dp or None) == (m.get("dp") or None), f"{where}: the DP entry is not the training record's")
    if record.dp:
        eps = record.dp.get("epsilon")
        _need(isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0, f"{where}: invalid DP epsilon")
    src = m.get("source")
    _need(isinstance(src, dict), f"{where}: no source description")
    hashes = src.get("sample_hashes")
    n = src.get("n")
    _need(isinstance(n, int) and n > 0 and isinstance(hashes, list) and len(hashes) == n
          and all(isinstance(h, str) and _HEX64.fullmatch(h) for h in hashes),
          f"{where}: the source must list its n sample hashes (sha256 hex)")
    _need(isinstance(src.get("content_hash"), str) and bool(_HEX64.fullmatch(src["content_hash"])),
          f"{where}: the source has no valid content_hash")
    _need(record.source.get("content_hash") == src["content_hash"] and record.source.get("n") == n,
          f"{where}: the source description is not the training record's")
    classes, counts = src.get("classes"), src.get("class_counts")
    _need(isinstance(classes, list) and all(isinstance(c, str) for c in classes), f"{where}: invalid classes")
    if counts is not None:
        _need(isinstance(counts, dict) and list(counts) == classes and all(isinstance(v, int) and v >= 0
                                                                           for v in counts.values())
              and sum(counts.values()) == n, f"{where}: class_counts must give every class and add up to n")
    return Bundle(path, m, file_sha256(path / MANIFEST), tensors, cfg, record)


def check_importable(b: Bundle, backbone: Backbone) -> None:
    """What an import checks against the backbone: its hash, the tensors' names and shapes against the bundle's
    config on it, the source's labels within its classes."""
    where = f"bundle {b.path}"
    _need(b.backbone_hash == backbone.hash, f"{where} was trained on backbone {b.backbone_hash[:12]}, not "
          f"{backbone.hash[:12]}: the owner must train it on this backbone")
    comp = Compartment.for_backbone(backbone, b.config)
    try:
        comp.load_tensors(b.tensors, origin=where)
    except WeightsError as e:
        raise BundleError(str(e)) from None
    counts = b.source.get("class_counts")
    if b.config.conditional:
        _need(counts is not None, f"{where}: a class-conditional compartment's bundle must give class counts")
        used = [i for i, c in enumerate(counts.values()) if c > 0]
        _need(not used or max(used) < comp.num_classes, f"{where}: its source has labels beyond the backbone's "
              f"{comp.num_classes} classes")


def import_bundle(store: Store, backbone: Backbone, path: str | os.PathLike, *, name: str,
                  tags: tuple[str, ...] = (), actor: str | None = None) -> Imported:
    """Import a bundle into ``store`` as source ``name``: every check of :func:`read_bundle`, then the backbone
    (its hash must be the store's and ``backbone``'s) and the tensors' shapes against the config on this
    backbone, all before the first write. A ``name`` that is an imported source already is re-imported (its
    compartment replaced, joint compartments trained on it dropped); a source added with its data is refused."""
    from ..operations.sources import require_store_backbone

    check_source_name(name)
    b = read_bundle(path)
    have = require_store_backbone(store, backbone)
    store_hash = have["hash"] if have is not None else backbone.hash
    _need(b.backbone_hash == store_hash, f"bundle {b.path} was trained on backbone {b.backbone_hash[:12]}, but store "
          f"{store.path} uses backbone {store_hash[:12]}: the owner must train it on the store's backbone (`cdm "
          "train-compartment --backbone` with that one)")
    check_importable(b, backbone)
    counts = b.source.get("class_counts")
    known = {s["id"]: s for s in store.sources()}
    old = known.get(name)
    old_row = None
    if old is not None:
        if old["data_held"]:
            raise StoreError(f"source '{name}' was added with its data (`cdm add`): forget it first (`cdm forget "
                             f"{name} --store {store.path}`) or import under another name")
        if name in {r["cid"] for r in store.compartments()}:
            old_row = store.compartment(name)
        if old_row is not None and old_row["weights_sha256"] == b.manifest["weights_sha256"] \
                and old["content_hash"] == b.source["content_hash"]:
            return Imported(StoredCompartment.from_row(old_row), True, 0, 0)  # the same bundle again: nothing to do
    elif name in {r["cid"] for r in store.compartments()}:
        raise StoreError(f"'{name}' is the id of a {store.compartment(name)['kind']} in this store; choose another "
                         "name")
    # -- every check passed: the writes
    src = b.source
    new_hashes = set(src["sample_hashes"])
    n_removed = n_added = 0
    if have is None or have["ref"] is None:
        store.set_backbone(backbone.hash, backbone.ref, actor=actor)
    if old is None:
        store.add_source(name, content_hash=src["content_hash"], n=src["n"], classes=src["classes"],
                         tags=_tags(src.get("spec"), tags), actor=actor, pending=True, data_held=False)
    else:
        before = set(old_row["manifest"]["source"]["sample_hashes"]) if old_row is not None else set()
        n_removed, n_added = len(before - new_hashes), len(new_hashes - before)
        for r in store.compartments():
            if name in r["sources"] and r["cid"] != name:  # joint ones and its heads saw the old compartment
                store.remove_compartment(r["cid"], reason=f"re-import of '{name}'", actor=actor)
        store.update_source_content(name, content_hash=src["content_hash"], n=src["n"], classes=src["classes"],
                                    pending=True, actor=actor)
    manifest = {**b.record.to_dict(), "kind": "compartment",
                "imported": {"bundle_manifest_sha256": b.manifest_sha256, "bundle_created_at":
                             b.manifest.get("created_at"), "trained_by": b.record.machine, "class_counts": counts}}
    manifest["source"] = {**b.record.source, "spec": src.get("spec"), "id": name}
    row = store.put_compartment(name, b.tensors, manifest, kind="compartment", sources=[name],
                                backbone_hash=backbone.hash, actor=actor)
    details = {"bundle_manifest_sha256": b.manifest_sha256, "reimport": old is not None, "dp": bool(b.record.dp),
               "seed": b.config.seed}
    if old is not None:
        details.update(n_removed=n_removed, n_added=n_added)
    store.record("import", name, details, before=None if old_row is None else old_row["weights_sha256"],
                 after=row["weights_sha256"], actor=actor)
    return Imported(StoredCompartment.from_row(row), old is not None, n_removed, n_added)



def _tags(spec: str | None, tags: tuple[str, ...]) -> tuple[str, ...]:
    """``tags`` plus ``license:<SPDX>`` for a source of known licence (shipped emoji), as ``cdm add`` tags it."""
    from ..data import license_of

    lic = license_of(spec) if isinstance(spec, str) and spec else None
    if lic is None or any(t.startswith("license:") for t in tags):
        return tuple(tags)
    return (*tags, f"license:{lic}")
