"""The service's routes, one :class:`fastapi.APIRouter` per concern, each built for one app's
:class:`~cdm.server.context.Context`."""

from .admin import admin_router
from .generate import generate_router
from .service import service_router

__all__ = ["admin_router", "generate_router", "service_router"]
