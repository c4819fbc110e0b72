"""The compartment store: one directory holding a SQLite registry of data sources, one compartment of learned
prompt tensors per source (and joint ones: paragons, routers), an audit log, and resumable training state.

Forgetting a source deletes every compartment trained on it, their files and their training state, and
rewrites the registry so no deleted bytes remain. See :mod:`cdm.store.store` for the layout and the
crash-safety protocol.
"""

from __future__ import annotations

from .errors import StoreError
from .store import (KINDS, MANIFEST_NAME, PROMPTS_NAME, REGISTRY_NAME, RESERVED_NAMES, SCHEMA_VERSION, Store,
                    check_source_name)

__all__ = ["KINDS", "MANIFEST_NAME", "PROMPTS_NAME", "REGISTRY_NAME", "RESERVED_NAMES", "SCHEMA_VERSION", "Store",
           "StoreError", "check_source_name"]
