"""Credit attribution: which sources made a generated sample (likelihood decomposition and weight path)."""

from .credit import attribute, divergence, normalised_entropy, weight_path_credit

__all__ = ["attribute", "divergence", "normalised_entropy", "weight_path_credit"]
