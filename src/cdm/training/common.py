"""Pieces every training loop shares: per-step random generators, the lr schedule, a progress bar."""

from __future__ import annotations

import contextlib
import hashlib
import math
import os

import torch

__all__ = ["LR_SCHEDULES", "lr_at", "progress_bar", "step_generator"]

LR_SCHEDULES = ("constant", "cosine")


def step_generator(tag: str, seed: int, step: int) -> torch.Generator:
    """A generator that depends only on (tag, seed, step): resuming at any step replays the same randomness."""
    digest = hashlib.sha256(f"{tag}/{seed}/{step}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def lr_at(step: int, *, lr: float, warmup: int, steps: int, schedule: str) -> float:
    """Linear warm-up, then constant or cosine decay to 10% of ``lr``."""
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {schedule!r}")
    if step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "cosine":
        frac = (step - warmup) / max(1, steps - warmup)
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
    return lr


@contextlib.contextmanager
def progress_bar(name: str, total: int, completed: int, enabled: bool):
    """Yields ``update(completed, loss)``; a rich bar when enabled, a no-op otherwise."""
    if not enabled:
        yield lambda completed, loss: None
        return
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn(name), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                   TextColumn("loss {task.fields[loss]:.4f}"), TimeRemainingColumn())
    task = bar.add_task(name, total=total, completed=completed, loss=float("nan"))
    with bar:
        yield lambda completed, loss: bar.update(task, completed=completed, loss=loss)


@contextlib.contextmanager
def deterministic_algorithms():
    """Deterministic kernels inside the block; the caller's setting is restored after it."""
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    # With a GPU present, a kernel without a deterministic variant warns instead of failing (runs there are
    # reproducible only up to such kernels; the bit-identical guarantees are the CPU's). cuBLAS needs this
    # workspace setting to be deterministic at all.
    gpu = torch.cuda.is_available()
    if gpu:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=gpu)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
