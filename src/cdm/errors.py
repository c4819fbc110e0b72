"""Exceptions cdm raises for bad input. Each carries a short, specific message meant for a user."""

from __future__ import annotations

__all__ = ["CdmError", "DataError", "TrainingError", "WeightsError"]


class CdmError(Exception):
    """Base class: the CLI prints these as one line, without a traceback."""


class DataError(CdmError, ValueError):
    """An image, folder, archive or source that cdm cannot use."""


class WeightsError(CdmError, ValueError):
    """A checkpoint that is missing, corrupt, a pickle, or of the wrong shape or backbone."""


class TrainingError(CdmError, RuntimeError):
    """Training cannot go on (for instance a NaN loss)."""
