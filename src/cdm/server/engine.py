"""The service's model side, off the event loop: bounded compute pool, store access, generation, training jobs.

Threads:

- ``io`` (2 threads): key checks, registry reads, the audit log (milliseconds);
- ``compute`` (``Limits.workers`` threads): sampling. At most ``workers + queue`` generate requests are
  admitted at once, and at most ``Limits.per_key_queue`` of them from one key; the next one gets 503 at once
  (never an unbounded queue, and one key cannot fill it);
- ``forget`` (1 thread): forgetting a source (it waits for generate work in progress, below);
- ``jobs`` (1 thread): training a compartment for an uploaded source, sample-level forgetting (a retrain);
  at most ``Limits.max_jobs`` jobs wait.

Abandoned requests: while a generate request waits or runs, the event loop asks every
``Engine.poll_seconds`` whether its client is still connected. When it is gone, queued work is cancelled
(it never starts) and running work stops at its next sampler call; either way its places are freed at once.

Forgetting and generation (:class:`ForgetLock`, a reader-writer lock): a generate request holds the shared
side from the moment its work starts until its answer is built, and resolves its sources there (the default
set: every ready source its key may use *at that moment*; a named source forgotten since the request was
admitted: 410). Forgetting a source through the service (and the removal step of a sample-level forget) takes
the exclusive side: it waits for work in progress, and work that starts later sees the store without the
source. So once a forget has returned, no answer is built from the forgotten source. (A forget by another
process, e.g. the CLI, is seen by all work that starts after it, but does not wait for work in progress.)

Each thread opens its own :class:`~cdm.store.Store` once (a Store and its SQLite connection belong to one
thread); the store's file locks order them against each other and against other processes (the CLI). torch
uses ``Limits.threads`` intra-op threads in every one of them.

Every write is an operation of :mod:`cdm.operations` (or :meth:`Store.record` for key events and the log of
generate requests), with the calling key's name as the audit actor. Nothing about a compartment is cached
between requests: each request loads what the registry lists when its work starts.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import io
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from ..backbone import Backbone
from ..compartments import CompartmentConfig
from ..data import Source
from ..errors import CdmError
from ..store import Store

__all__ = ["Abandoned", "Busy", "Engine", "ForgetLock", "Job", "Limits", "Ticket", "png_base64"]


@dataclass(frozen=True)
class Limits:
    """What one request may ask for, and how much the service runs at once."""

    max_n: int = 16  # images per generate request
    max_steps: int = 100  # sampler steps per request
    max_body_bytes: int = 64 * 1024  # JSON bodies (413 above)
    max_upload_bytes: int = 32 * 1024 * 1024  # an uploaded .npz (413 above)
    max_upload_images: int = 20_000
    max_train_steps: int = 2000  # steps of a compartment trained for an uploaded source
    default_train_steps: int = 300
    workers: int = 1  # generate requests computed at once
    queue: int = 16  # generate requests waiting beyond those (503 when full)
    per_key_queue: int = 4  # generate requests of one key running or waiting (503 beyond: no key fills the queue)
    max_jobs: int = 4  # training jobs running or waiting (503 when full)
    threads: int = 1  # torch intra-op threads per worker thread

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, int) or v < (0 if f.name == "queue" else 1):
                raise ValueError(f"limit {f.name} must be a positive integer, got {v!r}")


class Abandoned(Exception):
    """The client of a generate request went away; its work was cancelled (queued) or stopped (running)."""


class Ticket:
    """One admitted generate request, shared by the event loop and the worker thread."""

    def __init__(self) -> None:
        self.abandoned = False  # set by the event loop when the client is gone
        self.sources: list[str] | None = None  # resolved when the work starts
        self.started = False


class _Watched:
    """A denoiser wrapper that notes non-finite inputs or outputs (a diverging sampler) and stops the sampler
    (:class:`Abandoned`) once the request's client is gone, forwarding the rest (``reset``, ``trajectory``,
    ``evals``) to the composed denoiser."""

    def __init__(self, inner, ticket: Ticket | None = None):
        self._inner = inner
        self._ticket = ticket
        self.diverged = False
        self.rows = 0  # denoiser evaluations (rows of every call)

    def __call__(self, x, t, **cond):
        import torch

        if self._ticket is not None and self._ticket.abandoned:
            raise Abandoned("the client went away")
        out = self._inner(x, t, **cond)
        self.rows += int(x.shape[0])
        if not (torch.isfinite(x).all() and torch.isfinite(out).all()):
            self.diverged = True
        return out

    def __getattr__(self, name):
        return getattr(self._inner, name)


class Busy(Exception):
    """The bounded queue is full (or the key's share of it)."""


class ForgetLock:
    """A writer-preferring reader-writer lock between generate work (shared) and forgetting (exclusive).

    A waiting forget blocks work that has not started yet, so a stream of requests cannot starve it; work in
    progress is never interrupted by it (the forget waits)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[float]:
        """Yields the seconds it waited for work in progress."""
        t0 = time.perf_counter()
        with self._cond:
            self._writers_waiting += 1
            try:
                while self._writer or self._readers:
                    self._cond.wait()
            finally:
                self._writers_waiting -= 1
            self._writer = True
        try:
            yield time.perf_counter() - t0
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


class _ExclusiveRemovals:
    """A Store seen through the forget lock: each compartment removal waits for generate work in progress (and
    holds off work that starts meanwhile). Everything else is forwarded. Used by the sample-level forget job,
    whose retrain (minutes) must not hold generation off, only its removal step."""

    def __init__(self, store: Store, lock: ForgetLock):
        self._store = store
        self._lock = lock

    def remove_compartment(self, cid: str, **kwargs) -> dict:
        with self._lock.exclusive():
            return self._store.remove_compartment(cid, **kwargs)

    def __getattr__(self, name):
        return getattr(self._store, name)


def png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def png_base64(image: np.ndarray) -> str:
    return base64.b64encode(png_bytes(image)).decode()


class _Pool:
    """A thread pool whose threads each set torch's thread count and open their own Store lazily."""

    def __init__(self, name: str, workers: int, threads: int, store_path: Path):
        self._local = threading.local()
        self._store_path = store_path
        self._threads = threads
        self.executor = ThreadPoolExecutor(workers, thread_name_prefix=f"cdm-{name}", initializer=self._init)

    def _init(self) -> None:
        import torch

        torch.set_num_threads(self._threads)

    def store(self) -> Store:
        st = getattr(self._local, "store", None)
        if st is None:
            st = self._local.store = Store.open(self._store_path)
        return st

    async def run(self, fn: Callable[..., Any], *args, **kwargs) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, partial(fn, *args, **kwargs))

    def shutdown(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


@dataclass
class Job:
    id: str
    kind: str
    target: str
    actor: str
    status: str = "queued"  # queued | running | done | failed
    steps_done: int = 0
    steps_total: int | None = None
    created_at: float = dataclasses.field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    result: dict | None = None
    error: str | None = None

    def to_dict(self) -> dict:
        progress = None
        if self.status == "done":
            progress = 1.0
        elif self.steps_total:
            progress = round(self.steps_done / self.steps_total, 4)
        return {"id": self.id, "kind": self.kind, "target": self.target, "actor": self.actor,
                "status": self.status, "progress": progress, "steps_done": self.steps_done,
                "steps_total": self.steps_total, "created_at": self.created_at, "started_at": self.started_at,
                "finished_at": self.finished_at, "result": self.result, "error": self.error}


class Engine:
    def __init__(self, store_path: str | Path, backbone: Backbone, limits: Limits):
        import torch

        self.store_path = Path(store_path)
        self.backbone = backbone
        self.limits = limits
        torch.set_num_threads(limits.threads)
        self.io = _Pool("io", 2, limits.threads, self.store_path)
        self.compute = _Pool("compute", limits.workers, limits.threads, self.store_path)
        self.jobs_pool = _Pool("jobs", 1, limits.threads, self.store_path)
        self.forget_pool = _Pool("forget", 1, limits.threads, self.store_path)
        self.forget_lock = ForgetLock()
        self.admitted = 0  # generate requests running or queued (touched on the event loop only)
        self.admitted_by_key: dict[str, int] = {}  # the same, per key name (event loop only)
        self.running = 0  # generate requests computing now (worker threads, under _stats_lock)
        self.jobs: dict[str, Job] = {}
        self._jobs_lock = threading.Lock()
        self._stats_lock = threading.Lock()
        self.stats = {"generated_requests": 0, "generated_images": 0, "rejected_busy": 0, "rejected_key_share": 0,
                      "abandoned_queued": 0, "abandoned_running": 0}

    poll_seconds = 0.1  # how often a waiting generate request checks that its client is still there

    def shutdown(self) -> None:
        for pool in (self.io, self.compute, self.jobs_pool, self.forget_pool):
            pool.shutdown()

    async def forgetting(self, fn: Callable[[Store], Any]) -> dict:
        """Run ``fn(store)`` (a forget) under the exclusive side of the forget lock, on the forget thread: it
        starts once generate work in progress has built its answers. Its result (a dict or a dataclass) as a
        dict, with ``waited_seconds`` added."""

        def run() -> dict:
            with self.forget_lock.exclusive() as waited:
                out = fn(self.forget_pool.store())
            return {**(out if isinstance(out, dict) else dataclasses.asdict(out)), "waited_seconds": round(waited, 4)}

        return await self.forget_pool.run(run)

    # ------------------------------------------------------------------------------------------ generation

    async def generate(self, *, key: str, resolve: Callable[[Store], list[str]],
                       is_gone: Callable[[], Any] | None = None, ticket: Ticket | None = None, **request) -> dict:
        """Admit, queue and compute one generate request of key ``key``. ``resolve(store)`` runs when the work
        starts (in the worker, under the shared forget lock) and returns the sources to compose (or raises).
        ``is_gone()`` (async) is polled while the request waits or runs; when it says the client is gone the
        work is cancelled or stopped and :class:`Abandoned` is raised. 503 (:class:`Busy`) at once when the
        queue, or this key's share of it, is full."""
        cap, share = self.limits.workers + self.limits.queue, self.limits.per_key_queue
        if self.admitted >= cap:
            self.stats["rejected_busy"] += 1
            raise Busy(f"the service is busy: {self.admitted} generate requests are running or queued (limit "
                       f"{cap}); retry later")
        mine = self.admitted_by_key.get(key, 0)
        if mine >= share:
            self.stats["rejected_key_share"] += 1
            raise Busy(f"key '{key}' has {mine} generate requests running or queued (limit {share} per key); "
                       "retry when one has finished")
        self.admitted += 1
        self.admitted_by_key[key] = mine + 1
        ticket = ticket or Ticket()
        submitted = time.perf_counter()
        fut = self.compute.executor.submit(self._generate, ticket, resolve, submitted=submitted, **request)
        waiting = asyncio.wrap_future(fut)
        try:
            while True:
                done, _ = await asyncio.wait({waiting}, timeout=self.poll_seconds if is_gone else None)
                if done:
                    return waiting.result()
                if is_gone is not None and await is_gone():
                    ticket.abandoned = True
                    if fut.cancel():
                        self.stats["abandoned_queued"] += 1
                    else:  # running: it stops at its next sampler call; keep its places until it has
                        with suppress(Exception):
                            await waiting
                        self.stats["abandoned_running"] += 1
                    raise Abandoned("the client went away before its answer was ready")
        except asyncio.CancelledError:
            ticket.abandoned = True
            fut.cancel()
            raise
        finally:
            self.admitted -= 1
            left = self.admitted_by_key[key] - 1
            if left:
                self.admitted_by_key[key] = left
            else:
                del self.admitted_by_key[key]

    def _generate(self, ticket: Ticket, resolve: Callable[[Store], list[str]], *, classes: list[int] | None,
                  n: int, prompt: str | None = None, steps: int, seed: int, weighting: str, guidance: float,
                  solver: str | None, submitted: float) -> dict:
        if ticket.abandoned:
            raise Abandoned("the client went away while the request was queued")
        with self.forget_lock.shared():
            if ticket.abandoned:
                raise Abandoned("the client went away while the request was queued")
            ticket.started = True
            with self._stats_lock:
                self.running += 1
            try:
                return self._compute(ticket, resolve, classes=classes, prompt=prompt, n=n, steps=steps, seed=seed,
                                     weighting=weighting, guidance=guidance, solver=solver, submitted=submitted)
            finally:
                with self._stats_lock:
                    self.running -= 1

    def _compute(self, ticket: Ticket, resolve: Callable[[Store], list[str]], *, classes: list[int] | None,
                 n: int, prompt: str | None = None, steps: int, seed: int, weighting: str, guidance: float,
                 solver: str | None, submitted: float) -> dict:
        from ..attribution import weight_path_credit
        from ..operations import generate_from_store
        from ..viz import grid

        started = time.perf_counter()
        st = self.compute.store()
        sources = ticket.sources = resolve(st)
        labels = None if classes is None else np.resize(np.asarray(classes, dtype=np.int64), n)
        watched: list[_Watched] = []
        gen = generate_from_store(st, self.backbone, sources, labels=labels, n=n, weighting=weighting, solver=solver,
                                  steps=steps, guidance=guidance, seed=seed, batch_size=n,
                                  captions=None if prompt is None else [prompt] * n,
                                  denoiser_hook=lambda eps: watched.append(_Watched(eps, ticket)) or watched[-1])
        images = gen.images
        k = len(sources)
        # one compartment alone is not composed: its weight is 1 throughout
        mean_w = gen.mean_weights if gen.weights is not None else np.ones((len(images), k))
        final_w = gen.final_weights if gen.weights is not None else np.ones((len(images), k))
        if watched[0].diverged or not (np.isfinite(mean_w).all() and np.isfinite(final_w).all()):
            raise CdmError(f"the {gen.solver} sampler diverged (non-finite values) with {steps} steps; try another "
                           "number of steps")
        # the weight-path credit (cdm.attribution): the composition weights integrated over the sampling path
        # (every sampler call counts the same). The likelihood credit needs the probability-flow ODE and its
        # divergences, too slow per request: `cdm attribute`.
        credit = weight_path_credit(np.asarray(mean_w)[None])
        out_images = []
        for i, img in enumerate(images):
            out_images.append({
                "index": i,
                "label": None if gen.labels is None else int(gen.labels[i]),
                "png": png_base64(img),
                "weights": {s: round(float(mean_w[i, j]), 4) for j, s in enumerate(sources)},
                "final_weights": {s: round(float(final_w[i, j]), 4) for j, s in enumerate(sources)},
                "attribution": {s: round(float(credit[i, j]), 4) for j, s in enumerate(sources)},
            })
        done = time.perf_counter()
        with self._stats_lock:
            self.stats["generated_requests"] += 1
            self.stats["generated_images"] += len(images)
        return {
            "sources": sources,
            "compartments": [{"cid": c.cid, "weights_sha256": c.weights_sha256} for c in gen.compartments],
            "weighting": weighting, "solver": gen.solver, "steps": steps, "seed": seed, "n": len(images),
            "classes": classes, "prompt": prompt, "guidance": gen.guidance,
            "images": out_images,
            "grid_png": png_base64(grid(images, nrow=min(len(images), 8))),
            "weights_summary": "per image: time-averaged posterior weight of each source over all sampler calls "
                               "(weights) and at the last call (final_weights)",
            "attribution": "weight-path: per image, the time-integrated composition weight of each source "
                           "(cdm.attribution.weight_path_credit); the likelihood credit is `cdm attribute`",
            "evals": gen.evals if gen.evals is not None else watched[0].rows,
            "seconds": round(done - started, 4), "queue_seconds": round(started - submitted, 4),
        }

    # ------------------------------------------------------------------------------------------ jobs

    def _new_job(self, kind: str, target: str, actor: str, steps_total: int | None = None) -> Job:
        with self._jobs_lock:
            active = [j for j in self.jobs.values() if j.status in ("queued", "running")]
            if len(active) >= self.limits.max_jobs:
                raise Busy(f"{len(active)} jobs are running or queued (limit {self.limits.max_jobs}); retry later")
            job = Job(id=uuid.uuid4().hex[:16], kind=kind, target=target, actor=actor, steps_total=steps_total)
            self.jobs[job.id] = job
            finished = [j for j in self.jobs.values() if j.status in ("done", "failed")]
            for old in finished[:-100]:  # keep the last 100 finished jobs
                del self.jobs[old.id]
        return job

    def _run_job(self, job: Job, fn: Callable[[Job, Store], dict]) -> None:
        job.status, job.started_at = "running", time.time()
        try:
            job.result = fn(job, self.jobs_pool.store())
            job.status = "done"
        except Exception as e:  # noqa: BLE001 (reported in the job)
            job.status, job.error = "failed", f"{type(e).__name__}: {e}"
        finally:
            job.finished_at = time.time()

    def active_job(self, target: str) -> Job | None:
        with self._jobs_lock:
            return next((j for j in self.jobs.values() if j.target == target and j.status in ("queued", "running")),
                        None)

    def submit(self, kind: str, target: str, actor: str, fn: Callable[[Job, Store], dict],
               steps_total: int | None = None) -> Job:
        job = self._new_job(kind, target, actor, steps_total)
        self.jobs_pool.executor.submit(self._run_job, job, fn)
        return job

    def add_source_job(self, source: Source, *, name: str, cfg: CompartmentConfig, tags: tuple[str, ...],
                       actor: str) -> Job:
        """Train a compartment for ``source`` as a background job. Progress comes from pausing at every
        checkpoint (``max_minutes=0``, checkpoints every ~5% of the steps) and resuming, which
        :func:`cdm.operations.add_source` supports (a resumed run equals an uninterrupted one)."""
        from ..operations import add_source

        def run(job: Job, st: Store) -> dict:
            while True:
                if job.steps_done and name not in {s["id"] for s in st.sources()}:
                    raise RuntimeError(f"source '{name}' was forgotten while its compartment was training")
                res = add_source(st, self.backbone, source, name=name, cfg=cfg, tags=tags, actor=actor,
                                 max_minutes=0, progress=False)
                job.steps_done = int(res.record.steps_done)
                if res.finished:
                    rec = res.record
                    return {"source": name, "n": len(source), "steps": rec.steps_done,
                            "train_seconds": rec.wall_seconds, "final_loss": rec.final_loss,
                            "learned": rec.learned, "weights_sha256": res.compartment.weights_sha256}

        return self.submit("add-source", name, actor, run, steps_total=cfg.steps)

    def forget_samples_job(self, name: str, sample_ids: list[str], *, reason: str, actor: str) -> Job:
        from ..operations import forget_samples

        def run(job: Job, st: Store) -> dict:
            out = forget_samples(_ExclusiveRemovals(st, self.forget_lock), self.backbone, name, sample_ids,
                                 reason=reason, actor=actor, progress=False)
            return {"source": name, "n_removed": out.n_removed, "seconds": round(out.seconds, 3),
                    "before": out.before, "after": out.after, "dropped": out.dropped}

        return self.submit("forget-samples", name, actor, run)
