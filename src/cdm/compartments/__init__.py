"""Compartments: per-source deep prompts (and caption maps, adapters, LoRA) on the frozen backbone."""

from .compartment import Adapters, Compartment, CompartmentConfig, LoRAFactors, PromptTable, net_inputs

__all__ = ["Adapters", "Compartment", "CompartmentConfig", "LoRAFactors", "PromptTable", "net_inputs"]
