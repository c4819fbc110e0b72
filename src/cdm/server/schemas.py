"""The service's request and response models (pydantic). Most are fixed; the generate request depends on the
service's limits, the backbone's class count and the weighting registry, so :func:`make_schemas` builds it for
one app (its OpenAPI schema shows those bounds and choices)."""

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ..composition.registry import REGISTRY
from ..composition.registry import names as weighting_names
from ..sampling import SOLVERS
from .engine import Limits

__all__ = ["CompartmentUsed", "ForgetSamples", "GenerateResponse", "ImageOut", "KeyCreate", "Me", "RequestLimits",
           "Schemas", "SourceInfo", "make_schemas"]


# ---------------------------------------------------------------------------------------- generate
class SourceInfo(BaseModel):
    name: str
    n: int = Field(description="samples in the source")
    classes: list = Field(description="class labels present in the source")
    tags: list[str]
    ready: bool = Field(description="its compartment is trained (it can be generated from)")
    training: bool = Field(description="a job is training its compartment now")
    learned: bool | None = Field(description="false: its training kept step 0, the compartment equals the "
                                             "backbone (it learnt nothing from the source); null: not recorded")
    text: bool = Field(False, description="its compartment reads captions: generate with a prompt")


class RequestLimits(BaseModel):
    max_n: int
    max_steps: int
    per_key_queue: int = Field(description="generate requests of one key running or queued at once")
    classes: int = Field(description="class labels of the backbone (0..classes-1); 0: unconditional only")


class Me(BaseModel):
    name: str
    admin: bool
    sources: list[SourceInfo]
    weightings: list[str] = Field(description="weightings that can run on this key's ready sources (router, "
                                              "classifier, isolated only where their heads are trained)")
    limits: RequestLimits


class ImageOut(BaseModel):
    index: int
    label: int | None
    png: str = Field(description="base64 PNG of the image, in the store's image spec (grey or RGB)")
    weights: dict[str, float] = Field(description="time-averaged weight of each source for this image")
    final_weights: dict[str, float] = Field(description="weights at the last sampler call")
    attribution: dict[str, float] = Field(description="weight-path credit of each source for this image")


class CompartmentUsed(BaseModel):
    cid: str
    weights_sha256: str | None


class GenerateResponse(BaseModel):
    sources: list[str]
    compartments: list[CompartmentUsed]
    weighting: str
    solver: str
    steps: int
    seed: int
    n: int
    classes: list[int] | None
    prompt: str | None = Field(None, description="the caption every image was drawn for (text compartments)")
    guidance: float
    images: list[ImageOut]
    grid_png: str = Field(description="base64 PNG grid of all images")
    weights_summary: str
    attribution: str = Field(description="which attribution the images' `attribution` holds")
    evals: int = Field(description="(sample, compartment) denoiser evaluations in the last sampler call batch")
    seconds: float
    queue_seconds: float


# ---------------------------------------------------------------------------------------- admin
class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    name: str = Field(min_length=1, max_length=64)
    sources: list[str] = Field(default_factory=list, max_length=1024)
    tags: list[str] = Field(default_factory=list, max_length=64,
                            description="Access-tag patterns: every source so tagged, e.g. license:CC-BY-*")
    admin: bool = False


class ForgetSamples(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    sample_ids: list[str] = Field(min_length=1, max_length=10_000,
                                  description="sample content hashes (or >= 12-character prefixes)")
    reason: str = Field("", max_length=1000)


# ---------------------------------------------------------------------------------------- per app
@dataclass(frozen=True)
class Schemas:
    """The models that depend on one app's limits and backbone."""

    GenerateRequest: type[BaseModel]


def make_schemas(limits: Limits, n_classes: int) -> Schemas:
    """The models for a service with these limits and a backbone of ``n_classes`` classes (the weightings and
    solvers: those registered now)."""

    class GenerateRequest(BaseModel):
        model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
        sources: list[str] | None = Field(
            None, max_length=64, description="Sources to compose; default: every ready source this key may use. "
                                             "Any source outside the key's rights: 403 (never dropped); unknown: 404.")
        classes: list[int] | None = Field(
            None, max_length=limits.max_n,
            description=f"Class labels (0..{n_classes - 1}), cycled over the n images; null: unconditional.")
        prompt: str | None = Field(
            None, max_length=500, description="A caption (text-conditioned compartments): n images of it. Not with "
                                              "classes.")
        n: int = Field(4, ge=1, le=limits.max_n, description="Number of images.")
        steps: int = Field(25, ge=1, le=limits.max_steps, description="Sampler steps.")
        seed: int = Field(0, ge=0, le=2**31 - 1)
        weighting: Literal[tuple(weighting_names())] = Field(
            "ito", description="How composition weights are obtained: " + "; ".join(
                f"{k}: {REGISTRY[k].help}" for k in weighting_names()) + " (router, classifier and isolated need "
                "their heads trained in the store; /v1/sources lists what the key's sources can run).")
        guidance: float = Field(2.0, ge=1.0, le=10.0, description="Classifier-free guidance (class or caption "
                                                                   "conditional only).")
        solver: Literal[tuple(SOLVERS)] | None = Field(
            None, description="Default: what the weighting needs (ddpm, the ancestral solver, for ito over several "
                              "sources), else ddim.")

    return Schemas(GenerateRequest=GenerateRequest)
