"""Differential privacy for compartments: DP-SGD on the prompt table (Opacus), sample-level (epsilon, delta)."""

from .dp import ACCOUNTANTS, DPConfig, PromptDenoiser, calibrate, epsilon_spent, train_compartment_dp

__all__ = ["ACCOUNTANTS", "DPConfig", "PromptDenoiser", "calibrate", "epsilon_spent", "train_compartment_dp"]
