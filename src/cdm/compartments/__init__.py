"""Compartments: per-source deep prompts (and caption maps, adapters) on the frozen backbone."""

from .compartment import Adapters, Compartment, CompartmentConfig, PromptTable, net_inputs

__all__ = ["Adapters", "Compartment", "CompartmentConfig", "PromptTable", "net_inputs"]
