"""Sources in a store: add one (train its compartment), train the paragon, forget a source or samples of it.

A source's own samples are kept in the store (:meth:`~cdm.store.Store.samples_file`, registered as training
state of that source) so that a sample-level forget can retrain the compartment from scratch; forgetting the
source deletes them with everything else derived from it. The backbone is a property of the store
(:func:`store_backbone`): every operation here refuses another one before it writes anything.

In latent mode a source's latents are computed once and cached beside its samples (:func:`model_inputs`), keyed
by the source's content hash and the autoencoder's hash; they go wherever its samples go.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from ..backbone import DEFAULT_BACKBONE, Backbone
from ..compartments import Compartment, CompartmentConfig
from ..data import Source, concat_sources, license_of, load_npz
from ..errors import CdmError
from ..io import save_state_dict
from ..store import Store, StoreError, check_source_name
from ..training.compartment import canonical_index, check_source_fits, train_compartment
from ..training.record import TrainingRecord
from .results import Added, Retrain, SamplesForgotten, SourceForgotten, StoredCompartment

__all__ = ["PARAGON", "add_source", "add_source_dp", "check_add", "check_trainable", "forget_samples", "forget_source",
           "imported_refusal", "license_tags", "load_compartment", "model_inputs", "paragon_config",
           "register_source", "require_store_backbone", "source_data", "store_backbone", "store_trained",
           "train_paragon", "train_source", "training_inputs"]

PARAGON = "paragon"


def store_backbone(store: Store, backbone: Backbone | str | Path | None = None) -> Backbone:
    """The backbone every command on ``store`` trains and samples with: the store's own (recorded when the store
    was created), or ``backbone`` when the store has none yet (default: the shipped one). An explicit
    ``backbone`` (a :class:`Backbone`, a directory or ``shipped:NAME``) with another hash than the store's is
    refused, naming both. Nothing is written (the first compartment records the backbone)."""
    have = store.backbone
    if backbone is not None:
        bb = backbone if isinstance(backbone, Backbone) else Backbone.from_pretrained(backbone)
        require_store_backbone(store, bb)
    elif have is None:
        bb = Backbone.from_pretrained(DEFAULT_BACKBONE)
    elif have["ref"] is not None:
        try:
            bb = Backbone.from_pretrained(have["ref"])
        except CdmError as e:
            raise CdmError(f"store {store.path}: its backbone {have['ref']} cannot be loaded ({e}); pass "
                           f"--backbone DIR with the backbone of hash {have['hash'][:12]}") from None
        if bb.hash != have["hash"]:
            raise CdmError(f"store {store.path}: the backbone at {have['ref']} is now {bb.hash[:12]}, not the "
                           f"store's {have['hash'][:12]}; pass --backbone DIR with the store's backbone")
    else:  # a store from before backbones were recorded: its hash may be a shipped backbone's
        from ..shipped import PREFIX, names

        for name in names():
            if name.startswith("backbone"):
                cand = Backbone.from_pretrained(PREFIX + name)
                if cand.hash == have["hash"]:
                    bb = cand
                    break
        else:
            raise CdmError(f"store {store.path} was made with backbone {have['hash'][:12]}, which is not shipped: "
                           "pass --backbone DIR")
    return bb


def require_store_backbone(store: Store, backbone: Backbone) -> dict | None:
    """Refuse a backbone that is not the store's (before anything is written), naming both hashes; returns the
    store's record."""
    have = store.backbone
    if have is not None and have["hash"] != backbone.hash:
        raise CdmError(f"backbone {backbone.ref or '(in memory)'} is {backbone.hash[:12]}, but store {store.path} "
                       f"was created with backbone {have['hash'][:12]}"
                       + (f" ({have['ref']})" if have["ref"] else "") + ": leave out --backbone to use the store's")
    return have


def source_data(store: Store, name: str) -> Source:
    """The samples of a registered source, as kept in the store."""
    path = store.samples_file(name)  # unknown source -> StoreError
    if not path.is_file():
        if not store.source(name).get("data_held", True):
            raise StoreError(f"source '{name}' was imported from a compartment bundle: this store does not hold its "
                             "samples, so nothing here can train on them (its owner trains, then `cdm import`s)")
        raise StoreError(f"source '{name}' has no stored samples (it was added without them)")
    return load_npz(path, id=name)


def _cached_rows(path: Path, want: dict, order: np.ndarray, key: str, shape: tuple, compute,
                 extras: tuple[str, ...] = ()) -> tuple:
    """Per-sample rows of a source (in the source's order) cached at ``path`` in content order (``order``), with
    ``want`` as the file's metadata, beside the named ``extras`` tensors ``compute`` also returns. Read when the
    metadata, the rows' shape and the extras' names match; else (missing, stale or damaged) computed by
    ``compute() -> (rows, {extra: tensor})`` and saved. Rows are computed one sample at a time, so a cached row
    equals a fresh one bit for bit. Returns ``(rows, {extra: tensor})``."""
    index = torch.from_numpy(order)
    if path.is_file():
        try:
            with safe_open(str(path), "pt") as f:
                meta, tensors = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
            rows = tensors.pop(key)
            if {k: meta.get(k) for k in want} == want and tuple(rows.shape) == shape and set(tensors) == set(extras):
                out = torch.empty_like(rows)
                out[index] = rows
                return out, tensors
        except (OSError, ValueError, KeyError, SafetensorError):
            pass  # damaged: recompute below
    rows, computed = compute()
    save_state_dict(path, {key: rows[index].contiguous(), **computed}, metadata=want)
    return rows, computed


def model_inputs(store: Store, backbone: Backbone, name: str, source: Source | None = None) -> torch.Tensor | None:
    """Source ``name``'s samples in the backbone's space, rows in the source's order, for a latent backbone: read
    from the store's cache (``Store.latents_file``) or encoded once and cached. None for a pixel backbone (pixels
    are pooled on the fly: nothing worth caching). A cache file that does not match (content, autoencoder, row
    count, shape) is recomputed: encoding is per image, so a cached latent equals a fresh one bit for bit."""
    if not backbone.latent:
        return None
    codec = backbone.codec
    source = source if source is not None else source_data(store, name)
    path = store.latents_file(name, content_hash=source.content_hash, autoencoder_hash=codec.hash)
    want = {"content_hash": source.content_hash, "autoencoder_hash": codec.hash, "n": str(len(source))}
    shape = (len(source), codec.model_channels, codec.model_size, codec.model_size)
    return _cached_rows(path, want, canonical_index(source), "latents", shape,
                        lambda: (codec.encode(source.images), {}))[0]


def text_inputs(store: Store, name: str, encoder: str, source: Source | None = None):
    """Source ``name``'s caption embeddings under the registered text ``encoder`` (rows in the source's order, and
    the empty caption's), read from the store's cache (``Store.derived_file(name, "text", ...)``, beside its samples,
    forgotten with them) or embedded once and cached. Each caption is embedded alone, so cached = fresh."""
    from ..text import TEXT_ENCODERS, CaptionEmbeddings, caption_embeddings, text_dim

    source = source if source is not None else source_data(store, name)
    if source.captions is None:
        raise CdmError(f"source '{name}' has no captions")
    dim = text_dim(encoder)  # unknown encoder: ValueError naming the known ones
    encoder_hash = TEXT_ENCODERS[encoder].hash
    path = store.derived_file(name, "text", content_hash=source.content_hash, model_hash=encoder_hash)
    want = {"content_hash": source.content_hash, "encoder": encoder, "encoder_hash": encoder_hash,
            "n": str(len(source))}

    def compute():
        emb = caption_embeddings(source.captions, encoder)
        return emb.rows, {"empty": emb.empty}

    rows, extra = _cached_rows(path, want, canonical_index(source), "captions", (len(source), dim), compute,
                               extras=("empty",))
    return CaptionEmbeddings(rows, extra["empty"], encoder)


def training_inputs(store: Store, backbone: Backbone, name: str, source: Source, cfg: CompartmentConfig) -> dict:
    """The cached inputs a compartment of source ``name`` trains on: ``inputs`` (latents, or None for pixels) and,
    for a text compartment, ``text`` (caption embeddings)."""
    out = {"inputs": model_inputs(store, backbone, name, source)}
    if cfg.text:
        out["text"] = text_inputs(store, name, cfg.text_encoder, source)
    return out


def load_compartment(store: Store, backbone: Backbone, cid: str) -> Compartment:
    """A stored compartment, checked against this backbone and its hashes."""
    tensors, manifest = store.load_compartment(cid, backbone_hash=backbone.hash)
    comp = Compartment.for_backbone(backbone, CompartmentConfig.from_dict(manifest["config"]))
    comp.load_tensors(tensors, origin=f"compartment '{cid}'")
    return comp.eval().requires_grad_(False)


def _put(store: Store, cid: str, comp: Compartment, record: TrainingRecord, *, kind: str, sources: list[str],
         backbone: Backbone, actor: str | None) -> StoredCompartment:
    return _put_tensors(store, cid, comp.tensors(), record.to_dict(), kind=kind, sources=sources,
                        backbone_hash=backbone.hash, actor=actor)


def _put_tensors(store: Store, cid: str, tensors: dict[str, torch.Tensor], manifest: dict, *, kind: str,
                 sources: list[str], backbone_hash: str, actor: str | None) -> StoredCompartment:
    row = store.put_compartment(cid, tensors, {**manifest, "kind": kind}, kind=kind, sources=sources,
                                backbone_hash=backbone_hash, actor=actor)
    store.clear_work(cid)
    return StoredCompartment.from_row(row)


def check_trainable(backbone: Backbone, source: Source, *, cfg: CompartmentConfig, dp=None) -> None:
    """Everything training a compartment of ``source`` on ``backbone`` checks before it starts, with no store and
    no name: the source against the compartment config and the backbone (image spec, labels, classes, captions), a
    DP budget. ``cdm train-compartment`` (a data owner's machine) calls it before anything is written."""
    if len(source) == 0:
        raise CdmError(f"{source.id}: the source is empty")
    if source.spec != backbone.codec.spec:
        raise CdmError(f"{source.id}: its images are {source.spec}, the backbone takes {backbone.codec.spec}: fit "
                       "them first (cdm.data.fit; `cdm add` does it and says so)")
    check_source_fits(source, Compartment.for_backbone(backbone, cfg))
    if dp is not None and (cfg.text or cfg.adapter_rank or cfg.lora_rank):
        raise CdmError("DP-SGD trains prompt tables only: text-conditioned compartments, adapters and LoRA are not "
                       "supported with --dp yet")
    if dp is not None:
        _calibrate(dp.epsilon, dp.delta_for(len(source)), cfg.batch_size / len(source), cfg.steps, dp.accountant)


@functools.lru_cache(maxsize=256)
def _calibrate(epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str) -> float:
    """:func:`cdm.privacy.calibrate`, remembered: checking many sources of one size (``cdm add-many``) searches the
    noise multiplier once (a search takes seconds)."""
    from ..privacy import calibrate

    return calibrate(epsilon, delta, sample_rate, steps, accountant)


def check_add(backbone: Backbone, source: Source, *, name: str, cfg: CompartmentConfig, dp=None) -> None:
    """Everything :func:`add_source` checks that needs no store: the name, then :func:`check_trainable`. The CLI
    calls it before it creates a store."""
    check_source_name(name)
    check_trainable(backbone, source, cfg=cfg, dp=dp)


def add_source(store: Store, backbone: Backbone, source: Source, *, name: str, cfg: CompartmentConfig,
               tags: tuple[str, ...] = (), actor: str | None = None, max_minutes: float | None = None,
               progress: bool = True, dp=None) -> Added:
    """Register ``source`` as ``name`` and train its compartment (continual learning: no other compartment is
    touched). Interrupted or paused runs resume when called again with the same arguments.

    ``dp``: a :class:`~cdm.privacy.DPConfig` trains with DP-SGD (:mod:`cdm.privacy`; ``cfg.batch_size`` is the
    expected Poisson batch; the manifest's ``dp`` entry holds the achieved epsilon from the accountant, delta,
    noise multiplier, clip, sample rate, steps). A budget that cannot be met is refused before anything is
    registered.

    Everything is checked before the first write (the name, the source against the compartment config and the
    backbone, the backbone against the store's, a DP budget). The source is registered as incomplete until its
    compartment is stored, so an add that is killed is listed (``complete`` False, :meth:`Store.verify`) and
    resumes when run again.

    A source of known licence (shipped emoji: :func:`cdm.data.license_of`) is tagged ``license:<SPDX>`` unless
    ``tags`` names a licence already, so a key can be granted by licence (``cdm keys create --tags``)."""
    check_add(backbone, source, name=name, cfg=cfg, dp=dp)
    check_registrable(store, backbone, source, name)
    register_source(store, backbone, source, name=name, tags=tags, actor=actor)
    kwargs = dict(work_dir=store.work_dir(name, sources=[name]), max_minutes=max_minutes, progress=progress,
                  **training_inputs(store, backbone, name, source, cfg))
    comp, record = train_source(backbone, source, cfg, dp, **kwargs)
    if comp is None:
        record.source.update(spec=source.id, id=name)
        return Added(record, None)
    return Added(record, store_trained(store, backbone, name, comp.tensors(), record, spec=source.id, actor=actor))


def check_registrable(store: Store, backbone: Backbone, source: Source, name: str) -> None:
    """What :func:`register_source` would refuse, checked without writing: a name that has a compartment already,
    one registered with other content, a backbone that is not the store's."""
    existing = {r["cid"] for r in store.compartments()}
    if name in existing:
        raise StoreError(f"source '{name}' already has a compartment; forget it first or choose another name")
    require_store_backbone(store, backbone)
    if name in {s["id"] for s in store.sources()}:
        have = store.source(name)
        if have["content_hash"] != source.content_hash or have["n"] != len(source):
            raise StoreError(f"source '{name}' is already registered with other content; forget it first to "
                             "replace it")
        if not have.get("data_held", True):
            raise StoreError(f"source '{name}' is an imported one (its data is not held here): `cdm import` a new "
                             "bundle to replace it, or forget it first")


def register_source(store: Store, backbone: Backbone, source: Source, *, name: str, tags: tuple[str, ...] = (),
                    actor: str | None = None) -> None:
    """The driver's first writes for a new source: the store's backbone (once), the source registered as
    incomplete (``pending``: listed as such until its compartment is stored) with its tags (and licence tag), and
    its samples kept in the store. Idempotent for the same content (a resumed add)."""
    have = require_store_backbone(store, backbone)
    if have is None or have["ref"] is None:
        store.set_backbone(backbone.hash, backbone.ref, actor=actor)
    store.add_source(name, content_hash=source.content_hash, n=len(source), classes=list(source.classes),
                     tags=license_tags(source, tags), actor=actor, pending=True)
    data_path = store.samples_file(name, create=True)
    if not data_path.exists():
        source.to_npz(data_path)


def train_source(backbone: Backbone, source: Source, cfg: CompartmentConfig, dp=None, **kwargs
                 ) -> tuple[Compartment | None, TrainingRecord]:
    """The pure step of adding a source: train its compartment, touching no store. ``dp``: a
    :class:`~cdm.privacy.DPConfig` trains with DP-SGD. Keywords go to the training loop (``inputs``, ``text``,
    ``work_dir``, ``max_minutes``, ``progress``, ``on_batch``: plain training only). Returns ``(compartment,
    record)``, or ``(None, record)`` when ``max_minutes`` paused it. Deterministic: the same (backbone, source
    content, config, seed) gives the same tensors bit for bit, on whatever machine or worker process runs it
    (same thread count and device kind); :func:`add_source`, ``cdm add-many`` (as Ray tasks) and ``cdm
    train-compartment`` all train through it."""
    return _train(backbone, source, cfg, dp, **kwargs)


def store_trained(store: Store, backbone: Backbone, name: str, tensors: dict[str, torch.Tensor],
                  record: TrainingRecord, *, spec: str, actor: str | None = None,
                  extra: dict | None = None) -> StoredCompartment:
    """The driver's last write for a source: its trained compartment (tensors and training record, as
    :func:`train_source` returned them, possibly from another process) stored under ``name``, which completes the
    source; its training state is cleared. The record must be of this backbone and of the source's registered
    content. ``extra``: more manifest keys (an import's provenance)."""
    have = store.source(name)
    if record.backbone_hash != backbone.hash:
        raise CdmError(f"compartment of '{name}' was trained on backbone {record.backbone_hash[:12]}, not the "
                       f"store's {backbone.hash[:12]}")
    if record.source.get("content_hash") != have["content_hash"]:
        raise CdmError(f"compartment of '{name}' was trained on other content than the source registered as "
                       f"'{name}'")
    record.source.update(spec=spec, id=name)
    return _put_tensors(store, name, tensors, {**record.to_dict(), **(extra or {})}, kind="compartment",
                        sources=[name], backbone_hash=backbone.hash, actor=actor)


def license_tags(source: Source, tags: tuple[str, ...] | list[str] = ()) -> tuple[str, ...]:
    """``tags`` plus ``license:<SPDX>`` when the source's licence is known and no ``license:`` tag is given."""
    lic = license_of(source.id)
    if lic is None or any(t.startswith("license:") for t in tags):
        return tuple(tags)
    return (*tags, f"license:{lic}")


def _train(backbone: Backbone, source: Source, cfg: CompartmentConfig, dp, **kwargs):
    if dp is None:
        return train_compartment(backbone, source, cfg, **kwargs)
    from ..privacy import train_compartment_dp

    return train_compartment_dp(backbone, source, cfg, dp, **kwargs)


def add_source_dp(store: Store, backbone: Backbone, source: Source, *, name: str, cfg: CompartmentConfig, dp,
                  **kwargs) -> Added:
    """:func:`add_source` with DP-SGD training: ``dp`` is a :class:`~cdm.privacy.DPConfig`."""
    return add_source(store, backbone, source, name=name, cfg=cfg, dp=dp, **kwargs)


def paragon_config(store: Store, names: list[str], steps: int | None = None) -> CompartmentConfig:
    """The paragon's config: the sources' compartments' own (prompt count, conditioning, gating, lr ...), with
    their steps added up (the same budget as the compartments together) unless ``steps`` is given. Refused when
    the compartments were trained with different prompt tables (no single paragon matches them)."""
    cfgs = [CompartmentConfig.from_dict(store.compartment(n)["manifest"]["config"]) for n in names]
    shapes = {(c.n_prompts, c.conditional, c.gated, str(c.text_encoder), c.text_tokens, c.adapter_rank, c.lora_rank)
              for c in cfgs}
    if len(shapes) > 1:
        raise CdmError(f"the compartments of {', '.join(names)} have different prompt tables (n_prompts, "
                       f"conditional, gated, text encoder, text tokens, adapter rank, LoRA rank: {sorted(shapes)}): "
                       "no paragon has the same budget")
    from dataclasses import replace

    return replace(cfgs[0], steps=steps if steps is not None else sum(c.steps for c in cfgs))


def train_paragon(store: Store, backbone: Backbone, *, cfg: CompartmentConfig | None = None,
                  sources: list[str] | None = None, actor: str | None = None, max_minutes: float | None = None,
                  progress: bool = True) -> Added:
    """The paper's "no split" reference: one compartment with the same prompt budget trained on the union
    (``cfg`` default: :func:`paragon_config`)."""
    names = sources or [s["id"] for s in store.sources()]
    if not names:
        raise StoreError("the store has no sources to train a paragon on")
    require_store_backbone(store, backbone)
    cfg = cfg if cfg is not None else paragon_config(store, names)
    parts = [source_data(store, n) for n in names]
    union = concat_sources(parts, id="+".join(names))
    inputs = [training_inputs(store, backbone, n, p, cfg) for n, p in zip(names, parts, strict=True)]
    joint = {"inputs": None if inputs[0]["inputs"] is None else torch.cat([i["inputs"] for i in inputs])}
    if cfg.text:
        from ..text import CaptionEmbeddings

        joint["text"] = CaptionEmbeddings(torch.cat([i["text"].rows for i in inputs]), inputs[0]["text"].empty,
                                          cfg.text_encoder)
    comp, record = train_compartment(backbone, union, cfg, work_dir=store.work_dir(PARAGON, sources=names),
                                     max_minutes=max_minutes, progress=progress, **joint)
    record.source.update(id=PARAGON, sources=names)
    if comp is None:
        return Added(record, None)
    return Added(record, _put(store, PARAGON, comp, record, kind="paragon", sources=names, backbone=backbone,
                              actor=actor))


def forget_source(store: Store, name: str, *, reason: str = "", actor: str | None = None) -> SourceForgotten:
    """Remove the source, its compartment, its stored samples and every joint compartment trained on it. No
    training happens."""
    t0 = time.perf_counter()
    out = store.forget_source(name, reason=reason, actor=actor)
    return SourceForgotten(source=out["source"], removed=out["removed"],
                           retrain=[Retrain(r["cid"], r["kind"], r["sources"]) for r in out["retrain"]],
                           work_removed=out["work_removed"], audit_seq=out["audit_seq"],
                           seconds=time.perf_counter() - t0)


def forget_samples(store: Store, backbone: Backbone, name: str, sample_ids: list[str], *, reason: str = "",
                   actor: str | None = None, progress: bool = True) -> SamplesForgotten:
    """Remove samples from a source: the stored samples are rewritten without them and the compartment is
    retrained from scratch with its recorded config and seed, so the result is bit-identical to a compartment
    trained on the reduced source directly. A DP compartment is retrained with DP-SGD and its recorded privacy
    parameters (target epsilon, delta, clip, augmult, accountant). Joint compartments (paragon, router) that saw
    the source are dropped (they must be retrained; the audit record says so)."""
    t0 = time.perf_counter()
    if not sample_ids:
        raise CdmError("no sample ids given")
    if not store.source(name).get("data_held", True):
        raise CdmError(imported_refusal(store, name, sample_ids))
    row = store.compartment(name)
    require_store_backbone(store, backbone)
    if row["backbone_hash"] != backbone.hash:  # (a store from before backbones were recorded)
        raise CdmError(f"compartment '{name}' was trained on backbone {row['backbone_hash'][:12]}, not "
                       f"{backbone.hash[:12]}: an exact retrain needs the same backbone")
    cfg = CompartmentConfig.from_dict(row["manifest"]["config"])
    spec = row["manifest"].get("source", {}).get("spec", name)
    dp = _recorded_dp(row["manifest"].get("dp"))
    full = source_data(store, name)
    reduced = full.without(sample_ids, id=name)  # unknown or ambiguous ids -> DataError, nothing changed yet
    removed_n = len(full) - len(reduced)
    # 1. nothing trained on the samples may survive: the source's compartment and joint ones go first
    dropped = [r for r in store.compartments() if name in r["sources"]]
    for r in dropped:
        store.remove_compartment(r["cid"], reason=f"forget {removed_n} sample(s) of '{name}'", actor=actor)
    # 2. the stored samples lose them
    reduced.to_npz(store.samples_file(name, create=True))
    store.update_source_content(name, content_hash=reduced.content_hash, n=len(reduced), actor=actor)
    # 3. retrain from scratch (same config and seed)
    with torch.random.fork_rng():
        comp, record = _train(backbone, reduced, cfg, dp, work_dir=store.work_dir(name, sources=[name]),
                              progress=progress, **training_inputs(store, backbone, name, reduced, cfg))
    record.source.update(spec=spec, id=name)
    new = _put(store, name, comp, record, kind="compartment", sources=[name], backbone=backbone, actor=actor)
    seconds = time.perf_counter() - t0
    store.record("forget-samples", name, {
        "reason": reason, "n_removed": removed_n, "seconds": round(seconds, 2),
        "retrain": [{"cid": r["cid"], "kind": r["kind"]} for r in dropped if r["cid"] != name],
    }, before=row["weights_sha256"], after=new.weights_sha256, actor=actor)
    return SamplesForgotten(source=name, n_removed=removed_n, seconds=seconds, before=row["weights_sha256"],
                            after=new.weights_sha256, dropped=[r["cid"] for r in dropped if r["cid"] != name])


def imported_refusal(store: Store, name: str, sample_ids: list[str]) -> str:
    """Why samples of an imported source cannot be forgotten here, and what its data owner must do."""
    row = store.compartment(name) if name in {r["cid"] for r in store.compartments()} else None
    manifest = row["manifest"] if row is not None else {}
    spec = manifest.get("source", {}).get("spec") or "SPEC"
    seed = manifest.get("seed")
    these = "these samples" if len(sample_ids) > 1 else "this sample"
    return (f"source '{name}' was imported from a compartment bundle: this store does not hold its data and cannot "
            f"retrain it without {these} (nothing was changed). Its data owner must drop {these} from the data, "
            f"retrain with `cdm train-compartment <{spec} without them> --backbone <this store's backbone> --out "
            f"BUNDLE` (same options{f', --seed {seed}' if seed is not None else ''}) and send BUNDLE, which `cdm "
            f"import BUNDLE --store {store.path} --name {name}` re-imports. To stop using the source now: `cdm "
            f"forget {name} --store {store.path}`.")


def _recorded_dp(entry: dict | None):
    """The DPConfig a DP compartment was trained with, from its manifest's ``dp`` entry (None: not DP)."""
    if not entry:
        return None
    from ..privacy import DPConfig

    return DPConfig(epsilon=entry["target_epsilon"], delta=entry["delta"], max_grad_norm=entry["max_grad_norm"],
                    augmult=entry.get("augmult", 1), accountant=entry.get("accountant", "rdp"))
