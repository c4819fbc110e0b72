"""The à-la-carte service: generation by access rights over HTTP, a web page, forgetting and audit.

``create_app(store, backbone=..., limits=...)`` (FastAPI) and ``cdm serve``; API keys in the store's registry
(:mod:`cdm.server.keys`, ``cdm keys create|list|revoke``).
"""

from .engine import Limits
from .keys import ApiKey, ApiKeyError, authenticate, create_key, list_keys, revoke_key


def create_app(*args, **kwargs):
    """See :func:`cdm.server.app.create_app` (imported lazily: FastAPI is only needed to serve)."""
    from .app import create_app as _create

    return _create(*args, **kwargs)


__all__ = ["ApiKey", "ApiKeyError", "Limits", "authenticate", "create_app", "create_key", "list_keys", "revoke_key"]
