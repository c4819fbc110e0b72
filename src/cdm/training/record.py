"""The record of a compartment training run: what it saw, how, where, when. It is the body of the compartment's
manifest in a store (``to_dict``), and reads back from one (``from_dict``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

__all__ = ["TrainingRecord"]


@dataclass
class TrainingRecord:
    source: dict  # id, content_hash, n, sample_hashes (sorted); the store adds spec (and sources for a paragon)
    backbone_hash: str  # sha256 of the frozen backbone's weights
    config: dict  # the CompartmentConfig
    seed: int
    steps_done: int
    finished: bool  # steps_done reached config.steps (False: paused, resumable)
    wall_seconds: float  # training time, summed over resumed runs
    final_loss: float | None  # mean training loss of the last 100 steps
    commit: str | None  # git commit of the code that trained it
    machine: dict  # where it ran
    dp: dict | None = None  # DP-SGD: achieved epsilon, delta, noise multiplier, clip, sample rate, steps, ...
    validation: dict | None = None  # held-out slice: n, best_step (the prompts kept), best_loss, start_loss, curve
    # False when training changed nothing the source could see: no step, or validation kept step 0 (the starting
    # prompts; gated prompts then equal the backbone). `cdm add`, `cdm show`, `cdm sources` and the service say so.
    learned: bool = True
    extra: dict = field(default_factory=dict)  # keys written by other tools, kept on a round trip

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(out.pop("extra"))
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainingRecord:
        names = {f.name for f in fields(cls)} - {"extra"}
        return cls(**{k: v for k, v in d.items() if k in names}, extra={k: v for k, v in d.items() if k not in names})
