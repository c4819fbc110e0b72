"""Progress of many jobs, aggregated: a plain object that tasks report to (directly in the sequential executor,
as a Ray actor otherwise), and the one display the driver draws from its snapshots. Imports nothing heavy: the
actor's process loads only this module."""

from __future__ import annotations

import time

__all__ = ["Display", "ProgressBoard"]


class ProgressBoard:
    """Per job: steps done, total, attempts (a retried job starts again), and the process running it."""

    def __init__(self) -> None:
        self.jobs: dict[str, dict] = {}

    def started(self, name: str, pid: int, host: str, total: int) -> int:
        """A job (re)starts; returns its attempt number (1: first)."""
        job = self.jobs.setdefault(name, {"attempts": 0})
        job.update(step=0, total=total, pid=pid, host=host, attempts=job["attempts"] + 1, since=time.time())
        return job["attempts"]

    def update(self, name: str, step: int) -> None:
        if name in self.jobs:
            self.jobs[name]["step"] = step

    def reset(self, names: list[str]) -> None:
        """Forget these jobs (a new round of jobs of the same names)."""
        for name in names:
            self.jobs.pop(name, None)

    def snapshot(self) -> dict[str, dict]:
        return {k: dict(v) for k, v in self.jobs.items()}


class Display:
    """One display for a run: an overall bar (steps of every job, jobs stored) and a line naming the jobs that are
    running. ``enabled=False``: nothing is drawn."""

    def __init__(self, title: str, jobs: dict[str, int], enabled: bool = True):
        self.totals, self.enabled, self.done = dict(jobs), enabled, set()
        self.steps: dict[str, int] = {}
        self._bar = None
        if enabled:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self._bar = Progress(TextColumn(title), BarColumn(), TextColumn("{task.fields[stored]}"),
                                 TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[running]}"),
                                 console=Console(stderr=True), transient=False)
            self._task = self._bar.add_task(title, total=sum(self.totals.values()) or 1, stored="", running="")

    def __enter__(self) -> Display:
        if self._bar is not None:
            self._bar.__enter__()
        self.refresh({})
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self.refresh({})
            self._bar.__exit__(*exc)

    def finished(self, name: str) -> None:
        self.done.add(name)
        self.steps[name] = self.totals.get(name, 0)

    def refresh(self, snapshot: dict[str, dict]) -> None:
        for name, job in snapshot.items():
            if name not in self.done:
                self.steps[name] = job.get("step", 0)
        if self._bar is None:
            return
        running = [f"{n.split(':', 1)[-1]} {j.get('step', 0)}/{j.get('total', '?')}" + (f" (try {j['attempts']})"
                                                                     if j.get("attempts", 1) > 1 else "")
                   for n, j in sorted(snapshot.items()) if n not in self.done]
        self._bar.update(self._task, completed=sum(self.steps.values()),
                         stored=f"{len(self.done)}/{len(self.totals)} stored",
                         running=("running " + ", ".join(running[:4]) + (" ..." if len(running) > 4 else ""))
                         if running else "")
