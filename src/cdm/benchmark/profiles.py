"""What a benchmark run covers: its profile (sizes and steps), the methods compared, the two domains."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..composition.registry import names as weighting_names
from ..store import Store

__all__ = ["DOMAINS", "METHODS", "PROFILES", "BenchProfile", "class_groups", "methods", "selection",
           "with_overrides"]


@dataclass(frozen=True)
class BenchProfile:
    splits: tuple[int, ...] = (2, 4, 8)  # table 1 rows: sources the protected digits are split into
    methods: tuple[str, ...] = ()  # weightings table 1 compares (empty: every one the registry offers)
    budget: int = 1600  # paragon optimiser steps; each of K compartments gets budget // K (batch 64 throughout)
    n_prompts: int = 8  # prompts per block (compartments and paragon alike)
    head_steps: int = 300  # steps for the router and for each isolated head
    n: int = 500  # samples per evaluated cell, class-balanced (a multiple of 10)
    sample_steps: int = 50  # ancestral DDPM steps, every method
    guidance: float = 1.0  # classifier-free guidance scale (1: none; the composed distribution as is)
    bf16: bool = True  # bf16 autocast for sampling (2.3x faster here at equal FID, see benchmarks/backbone.py)
    two_domain_steps: int = 600  # steps per unconditional two-domain compartment
    two_domain_n: int = 200  # unconditional samples per two-domain weighting
    continual_n: int = 200  # samples per continual / drop step
    threshold: float = 0.01  # sparse gating: compartments below this weight are skipped
    class_threshold: float = 0.3  # sparse gating on class-group splits (the router's weights are near one-hot there)
    dp_steps: int = 300  # steps of each DP / non-DP unconditional compartment on all protected digits
    dp_epsilons: tuple[float, ...] = (3.0, 8.0)  # DP-SGD targets (plus one compartment without DP)
    attribution_n: int = 100  # unconditional samples attributed per setting
    seed: int = 0


PROFILES: dict[str, BenchProfile] = {
    # seconds: keeps the code path alive in CI (numbers mean nothing)
    "toy": BenchProfile(splits=(2,), budget=4, head_steps=2, n=20, sample_steps=3, two_domain_steps=2,
                        two_domain_n=10, continual_n=10, bf16=False, dp_steps=3, attribution_n=4),
    # what a new user runs: under 25 minutes on 2 cores (fewer steps and samples everywhere; numbers indicative)
    "quick": BenchProfile(budget=320, head_steps=50, n=100, sample_steps=20, two_domain_steps=150, two_domain_n=100,
                          continual_n=50, dp_steps=40, attribution_n=40),
    # the README's numbers
    "full": BenchProfile(),
}

METHODS = tuple(weighting_names())  # table 1 compares every weighting the registry offers, in its order
DOMAINS = {  # the two-domain parts' sources: digits 0-4 and 5-9
    "low": "mnist/protected/classes[0-4|5-9]-0", "high": "mnist/protected/classes[0-4|5-9]-1",
}


def methods(profile: BenchProfile) -> tuple[str, ...]:
    """The weightings a run's tables compare: the profile's, in registry order, else all of them."""
    unknown = [m for m in profile.methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; known: {', '.join(METHODS)}")
    return tuple(m for m in METHODS if m in profile.methods) if profile.methods else METHODS


def class_groups(k: int, classes: int = 10) -> list[list[int]]:
    """The classes divided among ``k`` sources as evenly as they go (10 into 8: [0,1], [2,3], [4], ... [9]): the
    paper's Table 1 "split uniformly across classes"."""
    return [g.tolist() for g in np.array_split(np.arange(classes), k)]


def with_overrides(profile: BenchProfile, **kw) -> BenchProfile:
    return replace(profile, **{k: v for k, v in kw.items() if v is not None})


def selection(out: Path, profile: BenchProfile, prefix: str = "k") -> dict:
    """Per split: the step each compartment kept (validation; 0 means it is exactly the backbone)."""
    res = {}
    for k in profile.splits:
        path = out / "stores" / f"{prefix}{k}"
        if not (path / "registry.sqlite").exists():
            continue
        with Store.open(path) as st:
            steps = {r["cid"]: (st.compartment(r["cid"])["manifest"].get("validation") or {}).get("best_step")
                     for r in st.compartments(kind="compartment")}
        res[str(k)] = {"best_steps": steps, "at_backbone": sum(1 for v in steps.values() if v == 0)}
    return res
