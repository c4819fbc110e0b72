"""What the operations return: typed results instead of string-keyed dicts (diffusers' ``SchedulerOutput``
in spirit). Stored manifests stay JSON; these are their views."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..training.record import TrainingRecord

__all__ = ["Added", "Attribution", "CompartmentUsed", "Generation", "HeadsTrained", "SamplesForgotten",
           "SourceForgotten", "StoredCompartment"]


@dataclass(frozen=True)
class StoredCompartment:
    """A compartment (or joint weighting) as the store's registry lists it."""

    cid: str
    kind: str
    sources: list[str]
    backbone_hash: str
    weights_sha256: str
    manifest_sha256: str
    created_at: str

    @classmethod
    def from_row(cls, row: dict) -> StoredCompartment:
        return cls(**{k: row[k] for k in ("cid", "kind", "sources", "backbone_hash", "weights_sha256",
                                          "manifest_sha256", "created_at")})


@dataclass(frozen=True)
class Added:
    """:func:`add_source` and :func:`train_paragon`: the training record, and the stored compartment once the
    run finished (None while paused: run again to resume)."""

    record: TrainingRecord
    compartment: StoredCompartment | None

    @property
    def finished(self) -> bool:
        return self.compartment is not None


@dataclass(frozen=True)
class Retrain:
    """A joint compartment removed by a forget, with the sources it must be retrained on."""

    cid: str
    kind: str
    sources: list[str]


@dataclass(frozen=True)
class SourceForgotten:
    source: str
    removed: list[str]  # compartments deleted (its own and every joint one trained on it)
    retrain: list[Retrain]  # the joint ones, with the sources left to retrain them on
    work_removed: list[str]  # training state deleted
    audit_seq: int
    seconds: float


@dataclass(frozen=True)
class SamplesForgotten:
    source: str
    n_removed: int
    seconds: float
    before: str  # weights_sha256 of the compartment before
    after: str  # and after the exact retrain
    dropped: list[str]  # joint compartments removed (retrain them)


@dataclass(frozen=True)
class HeadsTrained:
    """A learned weighting trained and stored: its registry entry and its training record (the manifest)."""

    compartment: StoredCompartment
    record: dict


@dataclass(frozen=True)
class CompartmentUsed:
    """A compartment a generation used: its id and the sha256 of its weights."""

    cid: str
    weights_sha256: str


@dataclass(frozen=True)
class Generation:
    """What :func:`generate_from_store` made, and how."""

    images: np.ndarray  # uint8, as the source data is stored (N, H, W)
    labels: np.ndarray | None  # each image's class (unconditional from class compartments: drawn), else None
    sources: list[str]  # the composed sources, in weight-column order (empty: the backbone alone)
    compartments: list[CompartmentUsed]
    weighting: str | None  # None for the backbone or one compartment alone
    solver: str
    steps: int
    seed: int
    guidance: float
    weights: np.ndarray | None  # (sampler calls, N, sources) posterior weights of each image's own branch
    evals: int | None  # (image, compartment) denoiser evaluations of a composition (sparse gating skips some)
    seconds: float  # wall time of sampling
    captions: list[str] | None = None  # the caption of each image, None unless text-conditioned

    @property
    def mean_weights(self) -> np.ndarray | None:
        """(N, sources): each image's weights averaged over the sampler calls (the weight-path credit)."""
        return None if self.weights is None else self.weights.mean(0)

    @property
    def final_weights(self) -> np.ndarray | None:
        """(N, sources): each image's weights at the last sampler call."""
        return None if self.weights is None else self.weights[-1]


@dataclass(frozen=True)
class Attribution:
    """:func:`attribute_samples`: unconditional samples and each source's credit for each of them."""

    images: np.ndarray  # uint8 (N, H, W)
    names: list[str]  # the sources, in column order
    priors: list[float]  # lambda_i
    density: str  # "class-mixture" or "prompt-row"
    credit: np.ndarray  # (N, sources) likelihood credit C_i (sums to 1 per sample)
    credit_se: np.ndarray  # (N, sources) its standard error over the Hutchinson probes
    weight_path: np.ndarray  # (N, sources) time-integrated composition weights
    loglik_change: np.ndarray  # (N,) log-likelihood change along the path, nats
    weights: np.ndarray  # (steps, N, sources) the composition weights along the path
    x0: np.ndarray  # (N, C, m, m) the samples in the model's space
    probes: int
    details: dict = field(default_factory=dict, repr=False)  # everything else cdm.attribution.attribute returned
