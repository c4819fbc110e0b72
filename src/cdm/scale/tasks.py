"""The unit of work of a scaled-out run: one job (a source's compartment, plain or DP, or its isolated head)
trained from plain data (:mod:`.payload`), touching no store. The same function runs in a Ray worker and, for
the sequential executor, in the driver itself, so both give the same tensors bit for bit.

A job is a JSON-ready dict: ``{"kind": "compartment" | "isolated-head", "name", "threads", "device", ...}``;
a compartment job adds ``cfg`` (a CompartmentConfig dict) and ``dp`` (a DPConfig dict or None); an isolated-head
job adds ``head_cfg`` and ``compartment`` (its tensors as bytes and its config). The result is ``{"name", "kind",
"tensors": safetensors bytes, "record": dict, "worker": {"pid", "host", "device", "threads"}}``. A job's
``kill_at`` (fault injection, for checks) SIGKILLs its own worker process at that step of its first attempt.
"""

from __future__ import annotations

import os
import signal
import socket
import time

import torch

from .payload import backbone_from_payload, source_from_payload, tensors_from_bytes, tensors_to_bytes

__all__ = ["JOB_KINDS", "run_job"]

JOB_KINDS = ("compartment", "isolated-head")
_REPORT_EVERY = 0.5  # seconds between progress reports of a running job


class _Reporter:
    """Reports a job's progress to the driver: an actor handle (Ray) or a local object (sequential); None: no
    reports. Throttled: at most one report per ``_REPORT_EVERY`` seconds, and always the last step."""

    def __init__(self, sink, name: str, total: int, kill_at: int | None = None):
        self.sink, self.name, self.total, self.kill_at = sink, name, total, kill_at
        self.step, self.last, self.attempt = 0, 0.0, 1

    def _call(self, method: str, *args, wait: bool = False):
        if self.sink is None:
            return None
        fn = getattr(self.sink, method)
        if hasattr(fn, "remote"):
            ref = fn.remote(*args)
            if wait:
                import ray

                return ray.get(ref)
            return None
        return fn(*args)

    def started(self) -> None:
        attempt = self._call("started", self.name, os.getpid(), socket.gethostname(), self.total, wait=True)
        self.attempt = attempt if isinstance(attempt, int) else 1

    def batch(self, _images=None) -> None:
        self.step += 1
        if self.kill_at is not None and self.step == self.kill_at and self.attempt == 1:
            # fault injection (checks of the retry path): this worker process dies as if killed from outside
            os.kill(os.getpid(), signal.SIGKILL)
        now = time.monotonic()
        if now - self.last >= _REPORT_EVERY or self.step >= self.total:
            self.last = now
            self._call("update", self.name, self.step)


def _device(job: dict) -> str:
    want = job.get("device", "cpu")
    if want == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"job {job['name']}: asked for cuda, but this worker sees no GPU")
    return want


def run_job(job: dict, backbone: dict, data: dict, progress=None) -> dict:
    """Train one job (see the module docstring) on ``backbone`` (:func:`~.payload.backbone_payload`) and ``data``
    (``{"source": source payload, "inputs": tensor | None, "text": {"rows", "empty", "encoder"} | None, "core":
    source payload (isolated heads)}``); ``progress``: where to report steps. Uses ``job["threads"]`` torch
    threads (restored after, for the sequential executor's driver)."""
    threads_before = torch.get_num_threads()
    torch.set_num_threads(int(job.get("threads", 1)))
    try:
        return _run(job, backbone, data, progress)
    finally:
        torch.set_num_threads(threads_before)


def _run(job: dict, backbone_payload: dict, data: dict, progress) -> dict:
    from ..compartments import Compartment, CompartmentConfig

    kind = job["kind"]
    if kind not in JOB_KINDS:
        raise ValueError(f"unknown job kind {kind!r}; known: {', '.join(JOB_KINDS)}")
    device = _device(job)
    bb = backbone_from_payload(backbone_payload, device)
    source = source_from_payload(data["source"])
    inputs = data.get("inputs")
    if kind == "compartment":
        from ..operations.sources import train_source

        cfg = CompartmentConfig.from_dict(job["cfg"])
        dp = None
        if job.get("dp"):
            from ..privacy import DPConfig

            dp = DPConfig.from_dict(job["dp"])
        rep = _Reporter(progress, f"{kind}:{job['name']}", cfg.steps, job.get("kill_at"))
        rep.started()
        kwargs = {"inputs": inputs, "progress": False}
        if dp is None:
            kwargs["on_batch"] = rep.batch
            if data.get("text") is not None:
                from ..text import CaptionEmbeddings

                t = data["text"]
                kwargs["text"] = CaptionEmbeddings(t["rows"], t["empty"], t["encoder"])
        comp, record = train_source(bb, source, cfg, dp, **kwargs)
        if dp is not None:  # DP training has no per-step hook: report the end
            rep.step = cfg.steps - 1
            rep.batch()
        tensors = comp.tensors()
        rec = record.to_dict()
    else:
        from ..composition import HeadConfig, train_isolated_head
        from ..composition.heads import state_tensors

        head_cfg = HeadConfig.from_dict(job["head_cfg"])
        rep = _Reporter(progress, f"{kind}:{job['name']}", 1)
        rep.started()
        comp = Compartment.for_backbone(bb, CompartmentConfig.from_dict(job["compartment"]["config"]))
        comp.load_tensors(tensors_from_bytes(job["compartment"]["tensors"]), origin=f"compartment {job['name']}")
        comp.eval().requires_grad_(False)
        core = source_from_payload(data["core"])
        head, rec = train_isolated_head(bb, comp, source, core, cfg=head_cfg, progress=False, inputs=inputs)
        tensors = state_tensors(head)
        rep.batch()
    return {"name": job["name"], "kind": kind, "tensors": tensors_to_bytes(tensors), "record": rec,
            "worker": {"pid": os.getpid(), "host": socket.gethostname(), "device": device,
                       "threads": torch.get_num_threads()}}
