"""Run many training jobs (:mod:`.tasks`) sequentially in this process or as Ray tasks, hand each result to the
driver as it arrives, and draw one progress display.

Ray: an embedded single-machine Ray by default (``workers`` CPUs, started with cdm's network discipline,
:mod:`.ray_env`), or an existing cluster (``address``). Each task asks for ``threads`` CPUs and, on a cluster
with GPUs (``device`` auto or cuda), ``gpus_per_task`` GPUs (default 1). A task whose worker process dies (killed,
out of memory, a lost node) is retried up to ``max_retries`` times by Ray; an exception raised by the job itself
(bad input) is not retried. The backbone is sent once (``ray.put``) and rebuilt once per worker process.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from ..backbone import Backbone
from ..errors import CdmError
from .payload import backbone_payload
from .progress import Display, ProgressBoard
from .tasks import run_job

__all__ = ["EXECUTORS", "ExecutorConfig", "RunReport", "Runner", "run_jobs", "runner"]

EXECUTORS = ("ray", "sequential")
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class ExecutorConfig:
    executor: str = "ray"  # "ray" or "sequential" (this process, one job after another)
    workers: int | None = None  # CPUs of the embedded Ray (default: this machine's); ignored with address
    address: str | None = None  # an existing Ray cluster (host:port); default: start an embedded one
    threads: int = 1  # torch threads (and Ray CPUs) per job; results are bit-identical at equal thread counts
    device: str = "auto"  # auto: cuda when the cluster (Ray) or this machine (sequential) has GPUs; cpu; cuda
    gpus_per_task: float | None = None  # default 1 when the device is cuda (fractions share a GPU), else 0
    max_retries: int = 3  # re-runs of a task whose worker process died
    kill_once: tuple[str, int] | None = None  # fault injection (checks): the worker process running compartment
    #                                           NAME is SIGKILLed at step K of its first attempt (Ray retries it)

    def __post_init__(self) -> None:
        if self.executor not in EXECUTORS:
            raise CdmError(f"unknown executor {self.executor!r}; known: {', '.join(EXECUTORS)}")
        if self.device not in DEVICES:
            raise CdmError(f"unknown device {self.device!r}; known: {', '.join(DEVICES)}")
        if self.threads < 1 or (self.workers is not None and self.workers < 1) or self.max_retries < 0:
            raise CdmError("--threads and --workers must be >= 1 and --max-retries >= 0")
        if self.gpus_per_task is not None and self.gpus_per_task < 0:
            raise CdmError("--gpus-per-task must be >= 0")
        if self.executor == "sequential" and (self.address or self.kill_once):
            raise CdmError("--ray-address (and fault injection) need --executor ray")


@dataclass
class RunReport:
    """What a run did: results handed to the driver, failures (job name -> reason), attempts per job (> 1: it was
    retried), where it ran, and how long it took."""

    executor: str
    device: str
    parallel: int  # jobs that can run at once
    seconds: float = 0.0
    done: list[str] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)
    attempts: dict[str, int] = field(default_factory=dict)
    killed: list[str] = field(default_factory=list)  # jobs whose worker the fault injection killed (kill_once)


def _steps(job: dict) -> int:
    return int(job["cfg"]["steps"]) if job["kind"] == "compartment" else 1


def _reason(e: BaseException) -> str:
    cause = getattr(e, "cause", None)  # ray.exceptions.RayTaskError: the job's own exception
    if isinstance(cause, BaseException):
        e = cause
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[-1] if text else ''}" if not isinstance(e, CdmError) else str(e)


class _LiveBoard(ProgressBoard):
    """The sequential executor's board: every report redraws the display."""

    def __init__(self, display: Display):
        super().__init__()
        self.display = display

    def update(self, name: str, step: int) -> None:
        super().update(name, step)
        self.display.refresh(self.snapshot())


def _key(job: dict) -> str:
    return f"{job['kind']}:{job['name']}"


class Runner:
    """Runs rounds of jobs in one session: this process (sequential) or one Ray session, whose backbone payload
    and progress board serve every round. Made by :func:`runner`."""

    def __init__(self, ex: ExecutorConfig, backbone: Backbone, ray=None):
        self.ex, self.backbone, self.ray = ex, backbone, ray
        self.killed: list[str] = []  # jobs given the fault injection (kill_once)
        if ray is None:
            self.device = ex.device if ex.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
            self.parallel, self.gpus = 1, 0.0
            return
        res = ray.cluster_resources()
        gpus_there = res.get("GPU", 0) > 0
        self.device = ex.device if ex.device != "auto" else ("cuda" if gpus_there else "cpu")
        if self.device == "cuda" and not gpus_there:
            raise CdmError("--device cuda: the Ray cluster has no GPU")
        self.gpus = (ex.gpus_per_task if ex.gpus_per_task is not None else 1.0) if self.device == "cuda" else 0.0
        self.parallel = max(1, int(res.get("CPU", 1) // ex.threads))
        if self.gpus:
            self.parallel = min(self.parallel, max(1, int(res.get("GPU", 0) // self.gpus)))
        self._bb_ref = ray.put(_payload(backbone))
        self._board = ray.remote(num_cpus=0)(ProgressBoard).remote()
        self._task = ray.remote(run_job)

    def run(self, items: list[tuple[dict, dict]], on_result: Callable[[dict], None], *, progress: bool = True,
            title: str = "training") -> RunReport:
        """Run ``items`` (``(job, data)`` pairs, :func:`~.tasks.run_job`), calling ``on_result(result)`` in this
        process for each as it finishes (the driver's writes). A job that fails is reported in
        :attr:`RunReport.failures`, after the others have run; an exception of ``on_result`` stops the run."""
        keys = [_key(job) for job, _ in items]
        if len(set(keys)) != len(keys):
            raise CdmError("job names must be unique")
        totals = {_key(job): _steps(job) for job, _ in items}
        t0 = time.perf_counter()
        run = self._sequential if self.ray is None else self._ray
        with Display(title, totals, progress) as display:
            report = run(items, on_result, display)
        report.seconds = time.perf_counter() - t0
        return report

    def _job(self, job: dict) -> dict:
        out = {**job, "threads": self.ex.threads, "device": self.device}
        if self.ex.kill_once is not None and job["kind"] == "compartment" and job["name"] == self.ex.kill_once[0] \
                and not self.killed:  # once per session
            out["kill_at"] = int(self.ex.kill_once[1])
            self.killed.append(job["name"])
        return out

    def _sequential(self, items, on_result, display: Display) -> RunReport:
        report = RunReport("sequential", self.device, 1)
        board = _LiveBoard(display)
        for job, data in items:
            try:
                result = run_job(self._job(job), _payload(self.backbone), data, board)
            except CdmError as e:
                report.failures[job["name"]] = str(e)
                continue
            on_result(result)
            display.finished(_key(job))
            report.done.append(job["name"])
        report.attempts = {k.split(":", 1)[1]: v["attempts"] for k, v in board.snapshot().items()}
        return report

    def _ray(self, items, on_result, display: Display) -> RunReport:
        ray, ex = self.ray, self.ex
        report = RunReport("ray", self.device, self.parallel)
        queue = list(items)
        pending: dict = {}
        window = 2 * self.parallel  # submitted ahead of free workers: the sources' data waits in the object store
        mine = {_key(job) for job, _ in items}
        ray.get(self._board.reset.remote(sorted(mine)))

        def submit() -> None:
            while queue and len(pending) < window:
                job, data = queue.pop(0)
                ref = self._task.options(num_cpus=ex.threads, num_gpus=self.gpus, max_retries=ex.max_retries,
                                         name=f"cdm-{job['kind']}-{job['name']}").remote(
                    self._job(job), self._bb_ref, data, self._board)
                pending[ref] = job

        submit()
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
            snap = {k: v for k, v in ray.get(self._board.snapshot.remote()).items() if k in mine}
            display.refresh(snap)
            for ref in ready:
                job = pending.pop(ref)
                try:
                    result = ray.get(ref)
                except Exception as e:  # the job's exception, or its worker lost more than max_retries times
                    report.failures[job["name"]] = _reason(e)
                    continue
                on_result(result)
                display.finished(_key(job))
                report.done.append(job["name"])
            submit()
        snap = ray.get(self._board.snapshot.remote())
        report.attempts = {k.split(":", 1)[1]: v["attempts"] for k, v in snap.items() if k in mine}
        report.killed = [n for n in self.killed if n in {k.split(":", 1)[1] for k in mine}]
        return report


@contextlib.contextmanager
def runner(ex: ExecutorConfig, backbone: Backbone) -> Iterator[Runner]:
    """A :class:`Runner` for the block: this process, or a Ray session (embedded or ``ex.address``) shut down
    after it."""
    if ex.executor == "sequential":
        yield Runner(ex, backbone)
        return
    from .ray_env import ray_session

    with ray_session(ex.workers or os.cpu_count() or 1, address=ex.address) as ray:
        yield Runner(ex, backbone, ray)


def run_jobs(items: list[tuple[dict, dict]], backbone: Backbone, ex: ExecutorConfig,
             on_result: Callable[[dict], None], *, progress: bool = True, title: str = "training") -> RunReport:
    """One round of jobs in a session of its own (see :meth:`Runner.run`)."""
    with runner(ex, backbone) as r:
        return r.run(items, on_result, progress=progress, title=title)


_PAYLOADS: dict[str, dict] = {}


def _payload(backbone: Backbone) -> dict:
    """The backbone payload, built once per backbone in this process."""
    if backbone.hash not in _PAYLOADS:
        _PAYLOADS.clear()
        _PAYLOADS[backbone.hash] = backbone_payload(backbone)
    return _PAYLOADS[backbone.hash]
