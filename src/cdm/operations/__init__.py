"""What an operator does to a compartment store, above the store and the training loops: the CLI, the service,
the benchmark and the demo call these and only display what they return (typed results, :mod:`.results`).

- :mod:`.sources`: add a source (train its compartment), the paragon, forget a source or samples of it; the
  store's backbone (:func:`store_backbone`).
- :mod:`.generate`: compose stored compartments; generate from the backbone, one compartment or a composition.
- :mod:`.learned`: learned weightings (router, noisy classifier, isolated heads): train, load, what can run.
- :mod:`.attribution`: credit attribution of generated samples to the sources.
"""

from .attribution import DENSITIES, attribute_samples, class_mixture_bank
from .generate import UNCONDITIONAL, class_counts, compose, generate_from_store, mixture_labels
from .learned import (ISOLATED_KIND, LEARNED_WEIGHTINGS, ROUTER_CIDS, head_cid, load_weighting, runnable_weightings,
                      train_heads, train_isolated_op, train_router_op)
from .results import (Added, Attribution, CompartmentUsed, Generation, HeadsTrained, Retrain, SamplesForgotten,
                      SourceForgotten, StoredCompartment)
from .sources import (PARAGON, add_source, add_source_dp, check_add, forget_samples, forget_source, license_tags,
                      load_compartment, model_inputs, paragon_config, source_data, store_backbone, train_paragon)

__all__ = ["Added", "Attribution", "CompartmentUsed", "DENSITIES", "Generation", "HeadsTrained", "ISOLATED_KIND",
           "LEARNED_WEIGHTINGS", "PARAGON", "ROUTER_CIDS", "Retrain", "SamplesForgotten", "SourceForgotten",
           "StoredCompartment", "UNCONDITIONAL", "add_source", "add_source_dp", "attribute_samples", "check_add",
           "class_counts", "class_mixture_bank", "compose", "forget_samples", "forget_source", "generate_from_store",
           "head_cid", "license_tags", "load_compartment", "load_weighting", "mixture_labels", "model_inputs",
           "paragon_config", "runnable_weightings", "source_data", "store_backbone", "train_heads",
           "train_isolated_op", "train_paragon", "train_router_op"]
