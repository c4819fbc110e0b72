"""The benchmarks' part cache: each part's result is kept as ``OUT/parts/<part>.json`` with when, where and how
long it ran, so a run can be done in chunks or resumed after a stop (rerun the same command)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from ..io import atomic_write_json
from ..provenance import git_commit

__all__ = ["PartCache"]


class PartCache:
    """``cache(part)`` returns the part's result, computing it with ``compute[part]()`` the first time (a part's
    function may call ``cache`` for the parts it needs). ``stamp`` is added to each new part's ``_part`` record
    (machine, device, command ...), next to its wall time, commit and date."""

    def __init__(self, out: Path, names: tuple[str, ...], compute: dict[str, Callable[[], dict]], stamp: dict):
        self.out, self.names, self.compute, self.stamp = Path(out), names, compute, stamp
        (self.out / "parts").mkdir(parents=True, exist_ok=True)
        self.done = {p: json.loads(self._path(p).read_text()) for p in names if self._path(p).exists()}

    def _path(self, part: str) -> Path:
        return self.out / "parts" / f"{part}.json"

    def __call__(self, part: str) -> dict:
        if part not in self.done:
            t0 = time.perf_counter()
            res = self.compute[part]()
            res["_part"] = {"wall_seconds": round(time.perf_counter() - t0, 1), "commit": git_commit(),
                            **self.stamp, "date": time.strftime("%Y-%m-%d %H:%M")}
            atomic_write_json(self._path(part), res)
            self.done[part] = res
        return self.done[part]

    def merged(self) -> dict:
        """Every finished part's results (without the ``_part`` records), in the order of ``names``."""
        out: dict = {}
        for part in self.names:
            if part in self.done:
                out.update({k: v for k, v in self.done[part].items() if k != "_part"})
        return out

    def field(self, key: str) -> dict:
        """``{part: _part[key]}`` over the finished parts."""
        return {p: r["_part"].get(key) for p, r in self.done.items()}
