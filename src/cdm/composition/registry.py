"""The weighting registry: every way to obtain composition weights, declared once.

Each entry says what it is, whether it needs heads trained and stored beside the compartments (and the command
that trains them), and whether it needs a stochastic (ancestral) solver. Everything that offers a choice of
weighting reads this table: the CLI's choices, the service's schema and page menu, the benchmark's methods.
One factory builds any of them (opacus' ``create_accountant(mechanism)`` in spirit)::

    w = create_weighting("ito", WeightingContext(schedule=backbone.schedule))

Learned weightings are read from a store, which lives above this layer: the caller passes a ``load`` callable
in the context (``cdm.operations`` does). To add a weighting: write its class (the :class:`Weighting`
protocol) and register it here; nothing else changes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import CdmError
from ..sampling import STOCHASTIC, NoiseSchedule
from .weighting import ItoWeighting, NaiveWeighting, OracleWeighting, SingleWeighting, Weighting

__all__ = ["REGISTRY", "WeightingContext", "WeightingSpec", "create_weighting", "names", "resolve_solver", "spec"]


@dataclass(frozen=True)
class WeightingContext:
    """What a weighting may need to be built. Give what you have; a factory says what it misses."""

    schedule: NoiseSchedule | None = None  # the backbone's noise schedule (ito)
    seed: int = 0  # draws of the single-source baseline
    load: Callable[[str], Weighting] | None = None  # learned weightings: name -> weighting loaded from a store
    log_density: list[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] | None = None  # oracle: exact densities


@dataclass(frozen=True)
class WeightingSpec:
    name: str
    help: str  # one line, shown by `cdm sample --help` and the service's schema
    factory: Callable[[WeightingContext], Weighting] = field(repr=False)
    stochastic: bool = False  # tracks densities along a noisy path: needs an ancestral solver (ddpm)
    heads: str | None = None  # kind of stored heads it needs ("router", "classifier", "isolated"), or None
    train: str | None = None  # the command that trains those heads
    public: bool = True  # offered to users (oracle is for analytic tests only)


def _need(ctx: WeightingContext, attr: str, name: str) -> Any:
    value = getattr(ctx, attr)
    if value is None:
        raise CdmError(f"the {name} weighting needs {attr} in its WeightingContext")
    return value


def _learned(name: str) -> Callable[[WeightingContext], Weighting]:
    return lambda ctx: _need(ctx, "load", name)(name)


REGISTRY: dict[str, WeightingSpec] = {s.name: s for s in (
    WeightingSpec("ito", "training-free: each source's density tracked along the sampling path (needs ddpm)",
                  lambda ctx: ItoWeighting(_need(ctx, "schedule", "ito")), stochastic=True),
    WeightingSpec("router", "the paper's router heads on the compartments' mid-block tokens",
                  _learned("router"), heads="router", train="cdm train-router --kind router"),
    WeightingSpec("classifier", "a separate noisy classifier over the sources",
                  _learned("classifier"), heads="classifier", train="cdm train-router --kind classifier"),
    WeightingSpec("isolated", "per-source density-ratio heads, each trained on its own source only",
                  _learned("isolated"), heads="isolated", train="cdm train-router --kind isolated"),
    WeightingSpec("naive", "w = lambda, a plain weighted average (the paper's baseline; makes hybrids)",
                  lambda ctx: NaiveWeighting()),
    WeightingSpec("single", "one source per sample drawn from lambda (the paper's other baseline)",
                  lambda ctx: SingleWeighting(torch.Generator().manual_seed(ctx.seed))),
    WeightingSpec("oracle", "exact log-densities from callables (analytic tests)",
                  lambda ctx: OracleWeighting(_need(ctx, "log_density", "oracle")), public=False),
)}


def names(public: bool = True) -> list[str]:
    """Registered weighting names (only those offered to users unless ``public=False``)."""
    return [k for k, s in REGISTRY.items() if s.public or not public]


def spec(name: str) -> WeightingSpec:
    if name not in REGISTRY or not REGISTRY[name].public:
        raise CdmError(f"unknown weighting {name!r}; known: {', '.join(names())}")
    return REGISTRY[name]


def create_weighting(name: str, ctx: WeightingContext | None = None) -> Weighting:
    """The one factory: build weighting ``name`` from what ``ctx`` holds."""
    if name not in REGISTRY:
        raise CdmError(f"unknown weighting {name!r}; known: {', '.join(names())}")
    return REGISTRY[name].factory(ctx or WeightingContext())


def resolve_solver(weighting: str, n_sources: int, solver: str | None = None) -> str:
    """The solver to sample with: ``solver`` if given (refused when the weighting cannot use it), else the
    weighting's need: ``ddpm`` for a stochastic weighting over several sources, ``ddim`` otherwise."""
    s = spec(weighting)
    needs = s.stochastic and n_sources > 1
    if solver is None:
        return "ddpm" if needs else "ddim"
    if needs and solver not in STOCHASTIC:
        raise CdmError(f"weighting {weighting} tracks densities along a stochastic path: use solver "
                       f"{' or '.join(sorted(STOCHASTIC))} (or leave the solver out)")
    return solver

