"""Compartments: per-source deep prompts on the frozen backbone."""

from .compartment import Compartment, CompartmentConfig, PromptTable

__all__ = ["Compartment", "CompartmentConfig", "PromptTable"]
