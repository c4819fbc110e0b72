"""The store's own exception (kept here, not in :mod:`cdm.errors`, so the store package stands alone)."""

from __future__ import annotations

from ..errors import CdmError

__all__ = ["StoreError"]


class StoreError(CdmError):
    """A store directory, source id or compartment id that the store cannot use (unknown, malformed, not a store)."""
