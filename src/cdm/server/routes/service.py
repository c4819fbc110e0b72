"""Health, the web page and its static files."""

from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse

from ..context import Context

__all__ = ["STATIC", "service_router"]

STATIC = Path(__file__).resolve().parent.parent / "static"


def service_router(ctx: Context) -> APIRouter:
    router = APIRouter()
    engine, limits = ctx.engine, ctx.limits

    @router.get("/healthz", tags=["service"], summary="Liveness, limits and counters (no key needed)")
    async def healthz() -> dict:
        return {"status": "ok", "limits": limits.__dict__, "admitted": engine.admitted, "running": engine.running,
                **engine.stats}

    @router.get("/", tags=["service"], include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @router.get("/static/{name}", include_in_schema=False)
    async def static(name: str) -> FileResponse:
        if name not in ("app.js", "style.css"):
            raise HTTPException(404, "not found")
        return FileResponse(STATIC / name)

    return router
