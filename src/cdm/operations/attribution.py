"""Credit attribution from a store: generate unconditional samples from a composition along the
probability-flow ODE and credit each to the sources (:mod:`cdm.attribution`)."""

from __future__ import annotations

import torch

from ..backbone import Backbone
from ..compartments import Compartment
from ..errors import CdmError
from ..store import Store
from .generate import class_counts
from .learned import load_weighting
from .results import Attribution
from .sources import load_compartment

__all__ = ["DENSITIES", "attribute_samples", "class_mixture_bank"]

def attribute_samples(store: Store, backbone: Backbone, names: list[str], *, n: int = 16, seed: int = 0,
                      steps: int = 25, probes: int = 2, exact: bool = False, priors: list[float] | None = None,
                      weighting: str = "ode", density: str = "auto", captions: list[str] | None = None
                      ) -> Attribution:
    """Generate ``n`` unconditional samples from the composition of stored compartments ``names`` along the
    probability-flow ODE and attribute each to the sources (:func:`cdm.attribution.attribute`). ``captions``
    (text compartments): one captioned sample per caption instead, attributed with every density conditioned on
    its caption, ``p_i(x | caption)``. ``weighting``:
    ``ode`` (tracked along the path) or a learned one from the store (router | classifier | isolated). Default
    priors: proportional to source size.

    ``density``: each source's unconditional density. ``class-mixture``: its class-conditional compartment's
    classes weighted by the source's own class counts (:class:`~cdm.composition.ClassMixtureBank`; needs
    class-conditional compartments, labelled sources and the ``ode`` weighting, as learned heads score sources,
    not (source, class) pairs); ``prompt-row``: the compartment's unconditional prompts; ``auto``: the class
    mixture where it applies."""
    from ..attribution import attribute
    from ..composition import CompartmentBank

    if not names:
        raise CdmError("no sources to attribute to")
    if density not in DENSITIES:
        raise CdmError(f"unknown density {density!r}; known: {', '.join(DENSITIES)}")
    comps = [load_compartment(store, backbone, nm) for nm in names]
    cond = {}
    if captions is not None:
        from .generate import caption_condition

        cond["text"], _ = caption_condition(store, list(names), list(captions))
        n, density = len(captions), "prompt-row" if density == "auto" else density
        if density != "prompt-row":
            raise CdmError("captioned samples are attributed with each compartment's caption-conditioned density "
                           "(density prompt-row)")
    if priors is None:
        priors = [float(store.source(nm)["n"]) for nm in names]
    w = None if weighting == "ode" else load_weighting(store, backbone, names, weighting)
    bank, row_priors = CompartmentBank(backbone, comps), list(priors)
    if density != "prompt-row":
        try:
            if w is not None:
                raise CdmError(f"no class mixture: the {weighting} weighting scores sources, not (source, class) "
                               "pairs")
            bank = class_mixture_bank(store, backbone, names, comps)
            row_priors, density = bank.priors(priors), "class-mixture"
        except CdmError:
            if density == "class-mixture":
                raise
            density = "prompt-row"
    m = backbone.codec.model_size
    noise = torch.randn((n, backbone.config.in_chans, m, m), generator=torch.Generator().manual_seed(seed))
    out = attribute(bank, noise, schedule=backbone.schedule, priors=row_priors, weighting=w,
                    x0_range=backbone.codec.x0_range, cond=cond, device=backbone.device,
                    steps=steps, probes=probes, exact=exact, seed=seed)  # noise drawn on the CPU, moved there
    keep = ("credit", "credit_se", "weight_path", "loglik_change", "weights", "x0", "probes")
    return Attribution(images=backbone.codec.decode(torch.as_tensor(out["x0"])), names=list(names),
                       priors=list(priors), density=density, credit=out["credit"], credit_se=out["credit_se"],
                       weight_path=out["weight_path"], loglik_change=out["loglik_change"], weights=out["weights"],
                       x0=out["x0"], probes=out["probes"],
                       details={k: v for k, v in out.items() if k not in keep})


DENSITIES = ("auto", "class-mixture", "prompt-row")  # attribute_samples(density=...)


def class_mixture_bank(store: Store, backbone: Backbone, names: list[str], comps: list[Compartment] | None = None):
    """Stored sources ``names`` as a :class:`~cdm.composition.ClassMixtureBank`: each class-conditional
    compartment's classes weighted by its source's stored class counts. ``comps``: the loaded compartments, if
    the caller has them. CdmError when a compartment is unconditional or a source's labels are missing."""
    from ..composition import ClassMixtureBank, CompartmentBank

    comps = comps if comps is not None else [load_compartment(store, backbone, nm) for nm in names]
    if not all(c.config.conditional for c in comps):
        raise CdmError("no class mixture: the compartments are not class-conditional")
    counts = class_counts(store, names, comps)
    if counts is None or (counts.sum(1) == 0).any():
        raise CdmError("no class mixture: a source's labels are missing")
    return ClassMixtureBank(CompartmentBank(backbone, comps), counts)
