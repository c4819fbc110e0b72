"""Composition of compartments (Prop. 3.1): a composed denoiser and the ways to weight its parts."""

from .bank import CompartmentBank
from .composed import CallableBank, ComposedDenoiser
from .weighting import WEIGHTINGS, ItoWeighting, NaiveWeighting, OracleWeighting, SingleWeighting, Weighting

__all__ = ["WEIGHTINGS", "CallableBank", "CompartmentBank", "ComposedDenoiser", "ItoWeighting", "NaiveWeighting", "OracleWeighting",
           "SingleWeighting", "Weighting"]
