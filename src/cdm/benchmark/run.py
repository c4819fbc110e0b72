"""``run_bench``: run (or resume) the benchmark's parts, cache each, merge them into results, plots and report."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from ..backbone import Backbone
from ..evaluation import DigitClassifier
from ..io import atomic_write_bytes, atomic_write_json
from ..provenance import git_commit, machine_info
from . import parts as part_fns
from .bench import Bench
from .cache import PartCache
from .parts import PARTS
from .plots import plot_table1
from .profiles import PROFILES, BenchProfile, methods, selection
from .report import report, where_ran

__all__ = ["run_bench"]


def run_bench(profile: str | BenchProfile, out: str | Path, *, backbone: str | Path, classifier: str | Path,
              parts: tuple[str, ...] = PARTS, progress: bool = False, meta: dict | None = None,
              device: str = "cpu") -> dict:
    """Run (or resume) the benchmark; returns the merged results, also written to ``out/results.json`` and
    ``out/report.md``. ``device``: where training, sampling, weightings and attribution run (``"cuda"``); the
    judge and FID stay on the CPU."""
    name = profile if isinstance(profile, str) else "custom"
    if isinstance(profile, str):
        if profile not in PROFILES:
            raise ValueError(f"unknown profile {profile!r}; known: {', '.join(PROFILES)}")
        profile = PROFILES[profile]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise ValueError(f"unknown parts {unknown}; known: {', '.join(PARTS)}")
    methods(profile)  # unknown weightings: ValueError naming the known ones
    if profile.n % 10 or profile.continual_n % 10:
        raise ValueError("n and continual_n must be multiples of 10 (class-balanced samples)")
    out = Path(out)
    (out / "parts").mkdir(parents=True, exist_ok=True)
    prof_file = out / "profile.json"
    current = _jsonable(asdict(profile))
    if prof_file.exists():  # fields added to the profile since that run are fine; changed ones are not
        old = json.loads(prof_file.read_text())
        if any(old[k] != current.get(k) for k in old):
            raise ValueError(f"{out} holds a run with another profile; use another --out or delete it")
    atomic_write_json(prof_file, _jsonable(asdict(profile)))
    bench = Bench(profile, out, Backbone.from_pretrained(backbone).to(device),
                  DigitClassifier.from_pretrained(classifier), progress)
    need = PartCache(out, PARTS, {
        "paragon": lambda: part_fns.paragon(bench),
        "table1": lambda: part_fns.table1(bench, need("paragon")["paragon"]),
        "two_domain": lambda: part_fns.two_domain(bench),
        "table1_classes": lambda: part_fns.table1_classes(bench, need("paragon")["paragon"]),
        # the stratified rows need table 1 (run or cached); without it, the class-group rows alone
        "cost": lambda: part_fns.cost(bench, need("table1")["table1_detail"] if "table1" in parts or "table1" in
                                      need.done else None, need("table1_classes")["table1_classes_detail"]),
        "unconditional": lambda: part_fns.unconditional(bench),
        "continual": lambda: part_fns.continual(bench),
        "forget": lambda: part_fns.forget(bench, need("paragon")["paragon"]["train_seconds"]),
        "memorization": lambda: (need("table1"), part_fns.memorization(bench))[1],
        "dp": lambda: part_fns.dp(bench),
        "attribution": lambda: part_fns.attribution(bench),
    }, stamp={"machine": machine_info(), "device": device, "command": (meta or {}).get("command")})
    for part in parts:
        need(part)
    results = need.merged()
    walls = need.field("wall_seconds")
    results["meta"] = {"commit": git_commit(), "machine": machine_info(), "profile": name,
                       "profile_config": _jsonable(asdict(profile)), "wall_seconds": round(sum(walls.values()), 1),
                       "part_seconds": walls, "part_commits": need.field("commit"),
                       "part_machines": {p: where_ran(r["_part"]) for p, r in need.done.items()}, "device": device,
                       **(meta or {})}
    if "table1" in results:
        plot_table1(results["table1"], out / "table1.png")
        results["table1_selection"] = selection(out, profile)
    if "table1_classes" in results:
        plot_table1(results["table1_classes"], out / "table1_classes.png", "class-group")
        results["table1_classes_selection"] = selection(out, profile, prefix="classes")
    atomic_write_json(out / "results.json", results)
    atomic_write_bytes(out / "report.md", report(results).encode())
    return results


def _jsonable(d: dict) -> dict:
    return json.loads(json.dumps(d))
