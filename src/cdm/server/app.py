"""The HTTP service: generation by access rights, admin operations, audit, and a web page (FastAPI).

``create_app(store_path, backbone=..., limits=...)`` returns the ASGI app; ``cdm serve`` runs it with uvicorn.
OpenAPI docs at ``/docs`` (Swagger UI needs a CDN; ``/openapi.json`` is always there), the page at ``/``.

Authentication: ``Authorization: Bearer <key>`` or ``X-API-Key: <key>`` (keys: :mod:`cdm.server.keys`).
Status codes: 401 missing / unknown / revoked key; 403 a source outside the key's rights, or an admin endpoint
with a non-admin key; 404 an unknown source (or job); 409 a source whose compartment is not trained yet, or a
name taken; 410 a named source forgotten while the request waited in the queue; 413 a body over the limit;
422 invalid parameters (limits on n, steps, classes ...; non-finite numbers such as NaN; the answer never
echoes the input); 503 the bounded queue, or the key's share of it, is full (``Retry-After`` set). A requested
source is never silently dropped.

Forgetting and generation: a generate request's sources are resolved when its work starts (the default, no
``sources``: every ready source the key may use at that moment), and the work holds off forgetting until its
answer is built; ``DELETE /v1/admin/sources/{name}`` (and the removal step of a sample-level forget) waits for
the work in progress and holds off work that has not started. So once a forget has returned, no answer is
built from the forgotten source: queued requests compose the remaining sources, or get 410 when they named it.

Abandoned requests: a generate request whose client disconnects is cancelled while queued, and stopped at its
next sampler step while running; its places in the queue are freed at once. Every generate request by a live
key is logged in the audit log (action ``generate``, actor and target the key's name, never its token; the
requested and composed sources, n, steps, seed, weighting, status and seconds).

Every answer carries ``Content-Security-Policy`` (the page: same-origin scripts, styles and images, plus
``data:`` images; ``/docs`` also allows the Swagger UI CDN), ``X-Frame-Options: DENY`` and
``X-Content-Type-Options: nosniff``.
"""


from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from ..backbone import Backbone
from ..errors import CdmError
from ..operations import store_backbone
from ..store import Store
from . import keys as keyring
from .auth import token_of
from .context import Context
from .engine import Busy, Engine, Limits
from .middleware import BodyLimit, SecurityHeaders, validation_errors
from .routes import admin_router, generate_router, service_router
from .schemas import make_schemas

__all__ = ["create_app"]

_TAGS = [
    {"name": "generate", "description": "Sources the caller may use, and generation from them."},
    {"name": "admin", "description": "Admin key only: keys, sources (add, forget), jobs, audit log."},
    {"name": "service", "description": "Health and the web page."},
]


def create_app(store_path: str | Path, *, backbone: Backbone | str | Path | None = None,
               limits: Limits | None = None) -> FastAPI:
    """The service for the store at ``store_path`` (which must exist). ``backbone``: a :class:`Backbone`, its
    directory or ``shipped:NAME`` (default: the store's own; another one is refused)."""
    store_path = Path(store_path)
    limits = limits or Limits()
    with Store.open(store_path) as st:  # exists, is a store (migrated, recovered); its own backbone by default
        bb = store_backbone(st, backbone)
    n_classes = bb.config.num_classes - (1 if bb.config.null_class is not None else 0)
    engine = Engine(store_path, bb, limits)
    ctx = Context(engine=engine, store_path=store_path, limits=limits, n_classes=n_classes,
                  schemas=make_schemas(limits, n_classes))
    from .. import composition, generation, operations, viz  # noqa: F401 (imported now, not by the first request)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        engine.shutdown()

    app = FastAPI(
        title="cdm service",
        version="0.1.0",
        description=("Image generation by access rights from a compartmentalized diffusion model: each key may "
                     "use a set of data sources; a generate request composes the compartments of the requested "
                     "sources (default: every source the key may use). Forgetting a source removes it for every "
                     "request whose work has not started, and waits for the work in progress. "
                     + (__doc__ or "").split("\n\n", 2)[2]),
        openapi_tags=_TAGS,
        lifespan=lifespan,
    )
    app.state.engine = engine  # the auth dependencies find the store through it
    app.state.limits = limits
    app.add_middleware(BodyLimit, limit_for=lambda path: (limits.max_upload_bytes if path == "/v1/admin/sources"
                                                         else limits.max_body_bytes))
    app.add_middleware(SecurityHeaders)  # outermost: the body limit's 413 gets the headers too

    # ---------------------------------------------------------------------------------------- errors
    @app.exception_handler(Busy)
    async def _busy(request: Request, exc: Busy):
        return JSONResponse({"detail": str(exc)}, status_code=503, headers={"Retry-After": "1"})

    @app.exception_handler(CdmError)
    async def _cdm_error(request: Request, exc: CdmError):
        status, msg = ctx.cdm_answer(exc)
        return JSONResponse({"detail": msg}, status_code=status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        errors = validation_errors(exc)
        if request.url.path == "/v1/generate" and request.method == "POST":  # logged like any generate request
            token = token_of(request)
            key = await engine.io.run(lambda: keyring.authenticate(engine.io.store(), token)) if token else None
            if key is not None:
                said = "; ".join(".".join(str(p) for p in e["loc"][1:]) + " " + e["msg"] for e in errors)
                details = {"status": 422, "outcome": f"invalid request: {said}"[:300]}
                await engine.io.run(ctx.log_generate, key.name, details)
        return JSONResponse({"detail": errors}, status_code=422)

    # ---------------------------------------------------------------------------------------- routes
    for router in (service_router(ctx), generate_router(ctx), admin_router(ctx)):
        app.include_router(router)
    return app
