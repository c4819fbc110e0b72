"""Composition of compartments (Prop. 3.1): a composed denoiser and the ways to weight its parts."""

from .bank import ClassMixtureBank, CompartmentBank
from .composed import CallableBank, ComposedDenoiser
from .heads import (AttentionPoolHead, ClassifierWeighting, HeadBank, HeadConfig, IsolatedWeighting, NoisyClassifier,
                    RouterWeighting, fit_density_ratio, train_isolated_head, train_noisy_classifier, train_router)
from .weighting import WEIGHTINGS, ItoWeighting, NaiveWeighting, OracleWeighting, SingleWeighting, Weighting

__all__ = ["WEIGHTINGS", "AttentionPoolHead", "ClassifierWeighting", "HeadBank", "HeadConfig", "IsolatedWeighting",
           "NoisyClassifier", "RouterWeighting", "fit_density_ratio", "train_isolated_head", "train_noisy_classifier",
           "train_router", "CallableBank", "ClassMixtureBank", "CompartmentBank", "ComposedDenoiser", "ItoWeighting",
           "NaiveWeighting", "OracleWeighting", "SingleWeighting", "Weighting"]
