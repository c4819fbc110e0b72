"""``cdm add-many``: add many sources to a store at once, their compartments trained as parallel jobs (Ray tasks
or one after another), the driver the store's only writer.

1. Everything is checked before the first write: each name, each source against the config and the backbone,
   the backbone against the store's, names already taken (``skip_existing``: a name whose stored compartment was
   trained on the same content with the same config is skipped, so an interrupted run resumes), DP budgets.
2. The driver registers every source (incomplete until its compartment is stored), keeps its samples in the store
   and computes the cached inputs (latents, caption embeddings) as ``cdm add`` does.
3. The jobs run (:func:`~.executor.run_jobs`); the driver stores each compartment as it arrives, through the
   same store protocol as ``cdm add`` (:func:`~cdm.operations.sources.store_trained`).
4. Optionally heads: each source's isolated head as another round of jobs (they need the stored compartments),
   or the joint router / noisy classifier trained by the driver afterwards (one job over every source).

A compartment stored here is bit-identical to the one ``cdm add`` (same config and seed, same thread count and
device kind) or a sequential run stores: the training of a source depends on its content, config and seed only.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from ..backbone import Backbone
from ..compartments import CompartmentConfig
from ..data import Source
from ..errors import CdmError
from ..operations.results import StoredCompartment
from ..operations.sources import (check_add, check_registrable, register_source, require_store_backbone,
                                  store_trained, training_inputs)
from ..store import Store
from ..training.record import TrainingRecord
from .executor import ExecutorConfig, RunReport, Runner, runner
from .payload import source_payload, tensors_from_bytes, tensors_to_bytes

__all__ = ["HEAD_KINDS", "ManyAdded", "add_many", "parse_named_spec"]

HEAD_KINDS = ("none", "isolated", "router", "classifier")


@dataclass
class ManyAdded:
    """What :func:`add_many` did: the compartments (and heads) it stored, those it skipped (already stored), the
    failures (name -> reason), and the executor's reports."""

    stored: dict[str, StoredCompartment] = field(default_factory=dict)
    records: dict[str, TrainingRecord] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)
    heads: dict[str, StoredCompartment] = field(default_factory=dict)
    runs: list[RunReport] = field(default_factory=list)
    seconds: float = 0.0


def parse_named_spec(arg: str) -> tuple[str, str]:
    """``NAME=SPEC`` -> (NAME, SPEC); the name must be a valid source name (so a spec's own ``seed=0`` is not
    mistaken for one)."""
    from ..store import check_source_name
    from ..store.errors import StoreError

    name, sep, spec = arg.partition("=")
    if sep:
        try:
            return check_source_name(name), spec
        except StoreError:
            pass
    raise CdmError(f"{arg!r}: give each source as NAME=SPEC (e.g. s0=mnist/protected/strat8-0)")


def _same(store: Store, name: str, source: Source, cfg: CompartmentConfig, dp) -> bool:
    """Whether ``name``'s stored compartment was trained on this content with this config (and DP)."""
    if name not in {r["cid"] for r in store.compartments(kind="compartment")}:
        return False
    m = store.compartment(name)["manifest"]
    same_dp = (m.get("dp") or {}).get("target_epsilon") == (dp.epsilon if dp is not None else None)
    return (m.get("source", {}).get("content_hash") == source.content_hash and m.get("config") == cfg.to_dict()
            and same_dp)


def add_many(store: Store, backbone: Backbone, sources: list[tuple[str, Source]], *, cfg: CompartmentConfig,
             ex: ExecutorConfig, dp=None, tags: tuple[str, ...] = (), actor: str | None = None,
             skip_existing: bool = False, heads: str = "none", head_cfg=None, core: Source | None = None,
             progress: bool = True, session: Runner | None = None) -> ManyAdded:
    """Add ``sources`` (``(name, source)`` pairs, images already fitted to the backbone) to ``store`` and train
    their compartments with the executor ``ex``; see the module docstring. Returns :class:`ManyAdded`; failed jobs
    leave their sources registered as incomplete (rerun with ``skip_existing`` to finish them). ``session``: a
    :func:`~.executor.runner` already started (several calls share one Ray session); default: one for this call."""
    t0 = time.perf_counter()
    if heads not in HEAD_KINDS:
        raise CdmError(f"unknown heads {heads!r}; known: {', '.join(HEAD_KINDS)}")
    names = [n for n, _ in sources]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise CdmError(f"source names given twice: {', '.join(dupes)}")
    if not sources:
        raise CdmError("no sources given")
    # 1. every check before the first write
    require_store_backbone(store, backbone)
    out = ManyAdded()
    todo: list[tuple[str, Source]] = []
    for name, source in sources:
        check_add(backbone, source, name=name, cfg=cfg, dp=dp)
        if skip_existing and _same(store, name, source, cfg, dp):
            out.skipped.append(name)
            continue
        check_registrable(store, backbone, source, name)
        todo.append((name, source))
    head_core = _head_core(backbone, core) if heads == "isolated" else None
    if heads in ("router", "classifier") and len(sources) + len(_other_compartments(store, names)) < 2:
        raise CdmError(f"a {heads} needs at least two sources")
    # 2. the driver's writes: register, keep the samples, cache the inputs
    items = []
    for name, source in todo:
        register_source(store, backbone, source, name=name, tags=tags, actor=actor)
        cached = training_inputs(store, backbone, name, source, cfg)
        text = cached.get("text")
        items.append(({"kind": "compartment", "name": name, "cfg": cfg.to_dict(),
                       "dp": None if dp is None else dp.to_dict()},
                      {"source": source_payload(source), "inputs": cached["inputs"],
                       "text": None if text is None else {"rows": text.rows, "empty": text.empty,
                                                          "encoder": text.encoder}}))
    specs = {name: source.id for name, source in sources}

    def store_result(result: dict) -> None:
        name = result["name"]
        record = TrainingRecord.from_dict(result["record"])
        record.extra["worker"] = result["worker"]
        out.stored[name] = store_trained(store, backbone, name, tensors_from_bytes(result["tensors"]), record,
                                         spec=specs[name], actor=actor)
        out.records[name] = record

    # 3. the jobs (and isolated heads: more jobs in the same session)
    if items or heads == "isolated":
        with _session(session, ex, backbone) as r:
            if items:
                run = r.run(items, store_result, progress=progress, title="add-many")
                out.runs.append(run)
                out.failures.update(run.failures)
            if heads == "isolated":
                _isolated_heads(store, backbone, [n for n in names if n not in out.failures], head_core, head_cfg,
                                r, out, actor, progress)
    # 4. joint heads, by the driver
    if heads in ("router", "classifier") and not out.failures:
        from ..operations.learned import train_heads

        for h in train_heads(store, backbone, None, heads, cfg=head_cfg, actor=actor, progress=progress):
            out.heads[h.compartment.cid] = h.compartment
    out.seconds = time.perf_counter() - t0
    return out


@contextlib.contextmanager
def _session(session: Runner | None, ex: ExecutorConfig, backbone: Backbone) -> Iterator[Runner]:
    if session is not None:
        yield session
    else:
        with runner(ex, backbone) as r:
            yield r


def _other_compartments(store: Store, names: list[str]) -> list[str]:
    return [r["cid"] for r in store.compartments(kind="compartment") if r["cid"] not in names]


def _head_core(backbone: Backbone, core: Source | None) -> Source:
    """The public core data isolated heads contrast each source with (default: the public digits), fitted."""
    from ..data import fit, public_protected

    if core is None:
        core = public_protected()[0]
        if core.spec != backbone.codec.spec:
            raise CdmError(f"isolated heads need public core data of this backbone's images ({backbone.codec.spec}); "
                           "the default (the public digits) is not: pass --core SPEC")
    return core if core.spec == backbone.codec.spec else fit(core, backbone.codec.spec)


def _isolated_heads(store: Store, backbone: Backbone, names: list[str], core: Source, head_cfg, r: Runner,
                    out: ManyAdded, actor: str | None, progress: bool) -> None:
    """Each source's isolated head as a job (from its stored compartment, its data and the core), stored by the
    driver as ``operations.learned.train_isolated_op`` stores it."""
    from ..composition import HeadConfig
    from ..operations.learned import ISOLATED_KIND, head_cid
    from ..operations.sources import load_compartment, model_inputs, source_data

    head_cfg = head_cfg or HeadConfig()
    rows = {}
    items = []
    core_payload = source_payload(core)
    for name in names:
        rows[name] = store.compartment(name)
        comp = load_compartment(store, backbone, name)
        data = source_data(store, name)
        items.append(({"kind": "isolated-head", "name": name, "head_cfg": head_cfg.to_dict(),
                       "compartment": {"config": comp.config.to_dict(), "tensors": tensors_to_bytes(comp.tensors())}},
                      {"source": source_payload(data), "inputs": model_inputs(store, backbone, name, data),
                       "core": core_payload}))

    def store_head(result: dict) -> None:
        name = result["name"]
        record = result["record"]
        record["sources_seen"][0].update(name=name, compartment_sha256=rows[name]["weights_sha256"])
        record["worker"] = result["worker"]
        row = store.put_compartment(head_cid(name), tensors_from_bytes(result["tensors"]), record,
                                    kind=ISOLATED_KIND, sources=[name], backbone_hash=backbone.hash, actor=actor)
        out.heads[head_cid(name)] = StoredCompartment.from_row(row)

    run = r.run(items, store_head, progress=progress, title="isolated heads")
    out.runs.append(run)
    out.failures.update({head_cid(k): v for k, v in run.failures.items()})
