"""Noise schedule and solvers (bottom layer: imports no model)."""

from .schedule import SCHEDULES, NoiseSchedule
from .solvers import SOLVERS, STOCHASTIC, Denoiser, classifier_free_guidance, sample

__all__ = ["SCHEDULES", "SOLVERS", "STOCHASTIC", "Denoiser", "NoiseSchedule", "classifier_free_guidance", "sample"]
