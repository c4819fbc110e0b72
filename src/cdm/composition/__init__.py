"""Composition of compartments (Prop. 3.1): a composed denoiser and the ways to weight its parts."""

from .bank import ClassMixtureBank, CompartmentBank
from .composed import CallableBank, ComposedDenoiser
from .head_training import HeadConfig, fit_density_ratio, train_isolated_head, train_noisy_classifier, train_router
from .heads import AttentionPoolHead, HeadBank, NoisyClassifier
from .learned import ClassifierWeighting, IsolatedWeighting, RouterWeighting
from .registry import REGISTRY, WeightingContext, WeightingSpec, create_weighting
from .weighting import ItoWeighting, NaiveWeighting, OracleWeighting, SingleWeighting, Weighting

__all__ = ["REGISTRY", "AttentionPoolHead", "CallableBank", "ClassMixtureBank", "ClassifierWeighting",
           "CompartmentBank", "ComposedDenoiser", "HeadBank", "HeadConfig", "IsolatedWeighting", "ItoWeighting",
           "NaiveWeighting", "NoisyClassifier", "OracleWeighting", "RouterWeighting", "SingleWeighting", "Weighting",
           "WeightingContext", "WeightingSpec", "create_weighting", "fit_density_ratio", "train_isolated_head",
           "train_noisy_classifier", "train_router"]
