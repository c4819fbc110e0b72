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


import asyncio
import json
import tempfile
import time
from contextlib import asynccontextmanager
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Literal

from fastapi import Depends, FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field

from ..backbone import Backbone
from ..composition.registry import REGISTRY, resolve_solver
from ..composition.registry import names as weighting_names
from ..errors import CdmError
from ..operations import runnable_weightings, store_backbone
from ..sampling import SOLVERS
from ..store import Store, StoreError, check_source_name
from . import keys as keyring
from .engine import Abandoned, Busy, Engine, Limits, Ticket

__all__ = ["create_app"]

STATIC = Path(__file__).resolve().parent / "static"
_TAGS = [
    {"name": "generate", "description": "Sources the caller may use, and generation from them."},
    {"name": "admin", "description": "Admin key only: keys, sources (add, forget), jobs, audit log."},
    {"name": "service", "description": "Health and the web page."},
]


class _BodyLimit:
    """413 for a request body over the limit: at once from Content-Length, or while reading a chunked body
    (which is then buffered, at most ``limit`` bytes, and replayed to the app)."""

    # Before a 413 the rest of the body is read and dropped, up to this many bytes: a client that writes its
    # whole body before reading (urllib, most scripts) then gets the 413 instead of a broken pipe.
    DRAIN_MAX = 64 * 1024 * 1024

    def __init__(self, app, limit_for):
        self.app = app
        self.limit_for = limit_for

    @classmethod
    async def _drain(cls, receive, already: int = 0) -> None:
        seen = already
        while seen <= cls.DRAIN_MAX:
            msg = await receive()
            if msg["type"] != "http.request":
                return
            seen += len(msg.get("body", b""))
            if not msg.get("more_body", False):
                return

    @staticmethod
    async def _reject(send, limit: int) -> None:
        body = json.dumps({"detail": f"request body too large (limit {limit} bytes)"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        limit = self.limit_for(scope["path"])
        headers = dict(scope["headers"])
        length = headers.get(b"content-length")
        if length is not None:
            try:
                too_big = int(length) > limit
            except ValueError:
                too_big = True
            if too_big:
                if length.isdigit() and int(length) <= self.DRAIN_MAX:
                    await self._drain(receive)
                return await self._reject(send, limit)
            return await self.app(scope, receive, send)
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] != "http.request":
                break
            size += len(msg.get("body", b""))
            if size > limit:
                if msg.get("more_body", False):
                    await self._drain(receive, size)
                return await self._reject(send, limit)
            chunks.append(msg.get("body", b""))
            if not msg.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


class _SecurityHeaders:
    """Content-Security-Policy, X-Frame-Options and X-Content-Type-Options on every answer. The page loads
    only same-origin scripts and styles and shows ``data:`` PNGs; the Swagger UI at ``/docs`` (and ReDoc at
    ``/redoc``) load their code from a CDN and run an inline bootstrap script, so those two pages get a policy
    that allows exactly that (they show no user data)."""

    PAGE = ("default-src 'self'; img-src 'self' data:; script-src 'self'; style-src 'self'; frame-ancestors 'none'; "
            "base-uri 'none'; form-action 'self'")
    DOCS = ("default-src 'self'; img-src 'self' data: https://fastapi.tiangolo.com https://cdn.jsdelivr.net; "
            "script-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net; "
            "style-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net https://fonts.googleapis.com; "
            "font-src 'self' https://fonts.gstatic.com; worker-src 'self' blob:; frame-ancestors 'none'; "
            "base-uri 'none'; form-action 'self'")
    DOCS_PATHS = ("/docs", "/docs/oauth2-redirect", "/redoc")

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        csp = (self.DOCS if scope["path"] in self.DOCS_PATHS else self.PAGE).encode()

        async def send_with_headers(msg):
            if msg["type"] == "http.response.start":
                drop = {b"content-security-policy", b"x-frame-options", b"x-content-type-options"}
                headers = [(k, v) for k, v in msg.get("headers", []) if k.lower() not in drop]
                headers += [(b"content-security-policy", csp), (b"x-frame-options", b"DENY"),
                            (b"x-content-type-options", b"nosniff")]
                msg = {**msg, "headers": headers}
            await send(msg)

        return await self.app(scope, receive, send_with_headers)


def _validation_errors(exc: RequestValidationError) -> list[dict]:
    """Pydantic's errors without the input (it may be NaN or Infinity, which JSON cannot carry, and echoing
    input back is needless): location, message and type, as short strings."""
    out = []
    for e in exc.errors():
        loc = [part if isinstance(part, int) else str(part)[:64] for part in e.get("loc", ())]
        msg = str(e.get("msg", "invalid value"))[:300]
        if e.get("type") == "finite_number":
            msg = "must be a finite number (no NaN or infinity)"
        out.append({"loc": loc, "msg": msg, "type": str(e.get("type", "value_error"))[:64]})
    return out


def _token_of(request: Request) -> str | None:
    """The API key a request carries (X-API-Key, else Authorization: Bearer)."""
    token = request.headers.get("x-api-key")
    if not token:
        scheme, _, cred = request.headers.get("authorization", "").partition(" ")
        token = cred.strip() if scheme.lower() == "bearer" else None
    return token or None


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
    app.state.engine = engine
    app.state.limits = limits
    app.add_middleware(_BodyLimit, limit_for=lambda path: (limits.max_upload_bytes if path == "/v1/admin/sources"
                                                          else limits.max_body_bytes))
    app.add_middleware(_SecurityHeaders)  # outermost: the body limit's 413 gets the headers too

    # ---------------------------------------------------------------------------------------- errors
    @app.exception_handler(Busy)
    async def _busy(request: Request, exc: Busy):
        return JSONResponse({"detail": str(exc)}, status_code=503, headers={"Retry-After": "1"})

    def _cdm_answer(exc: CdmError) -> tuple[int, str]:
        msg = str(exc).replace(str(store_path), "<store>")  # no server paths in answers
        if msg.startswith(("unknown source", "unknown compartment")):
            msg = msg.split("; known:")[0]  # never list other sources to the caller
        status = 404 if isinstance(exc, StoreError) and msg.startswith(("unknown source", "unknown compartment")) \
            else 422
        return status, msg

    @app.exception_handler(CdmError)
    async def _cdm_error(request: Request, exc: CdmError):
        status, msg = _cdm_answer(exc)
        return JSONResponse({"detail": msg}, status_code=status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        errors = _validation_errors(exc)
        if request.url.path == "/v1/generate" and request.method == "POST":  # logged like any generate request
            token = _token_of(request)
            key = await engine.io.run(lambda: keyring.authenticate(engine.io.store(), token)) if token else None
            if key is not None:
                said = "; ".join(".".join(str(p) for p in e["loc"][1:]) + " " + e["msg"] for e in errors)
                details = {"status": 422, "outcome": f"invalid request: {said}"[:300]}
                await engine.io.run(_log_generate, key.name, details)
        return JSONResponse({"detail": errors}, status_code=422)

    # ---------------------------------------------------------------------------------------- auth
    bearer = HTTPBearer(auto_error=False, description="An API key made with `cdm keys create`.")
    header = APIKeyHeader(name="X-API-Key", auto_error=False, description="The same key, as a header.")

    async def caller(cred: HTTPAuthorizationCredentials | None = Depends(bearer),
                     x_api_key: str | None = Depends(header)) -> keyring.ApiKey:
        token = x_api_key or (cred.credentials if cred is not None else None)
        if not token:
            raise HTTPException(401, "missing API key (Authorization: Bearer <key> or X-API-Key)",
                                headers={"WWW-Authenticate": "Bearer"})
        key = await engine.io.run(lambda: keyring.authenticate(engine.io.store(), token))
        if key is None:
            raise HTTPException(401, "unknown or revoked API key", headers={"WWW-Authenticate": "Bearer"})
        return key

    async def admin(key: keyring.ApiKey = Depends(caller)) -> keyring.ApiKey:
        if not key.admin:
            raise HTTPException(403, f"key '{key.name}' is not an admin key")
        return key

    def _source_rows() -> tuple[list[dict], set[str]]:
        st = engine.io.store()
        return st.sources(), {r["cid"] for r in st.compartments(kind="compartment")}

    def _learned(st: Store, name: str, ready: set[str]) -> bool | None:
        """The compartment manifest's ``learned`` (False: training kept step 0, it equals the backbone); None
        when it does not say or there is no compartment."""
        if name not in ready:
            return None
        try:
            value = st.compartment(name)["manifest"].get("learned")
        except StoreError:  # forgotten meanwhile
            return None
        return value if isinstance(value, bool) else None

    def _source_view(s: dict, ready: set[str], learned: bool | None = None) -> dict:
        return {"name": s["id"], "n": s["n"], "classes": s["classes"], "tags": s["tags"], "ready": s["id"] in ready,
                "training": engine.active_job(s["id"]) is not None, "learned": learned}

    def _log_generate(key_name: str, details: dict) -> None:
        engine.io.store().record("generate", key_name, details, actor=key_name)

    # ---------------------------------------------------------------------------------------- service
    @app.get("/healthz", tags=["service"], summary="Liveness, limits and counters (no key needed)")
    async def healthz() -> dict:
        return {"status": "ok", "limits": limits.__dict__, "admitted": engine.admitted, "running": engine.running,
                **engine.stats}

    @app.get("/", tags=["service"], include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str) -> FileResponse:
        if name not in ("app.js", "style.css"):
            raise HTTPException(404, "not found")
        return FileResponse(STATIC / name)

    # ---------------------------------------------------------------------------------------- generate
    class SourceInfo(BaseModel):
        name: str
        n: int = Field(description="samples in the source")
        classes: list = Field(description="class labels present in the source")
        tags: list[str]
        ready: bool = Field(description="its compartment is trained (it can be generated from)")
        training: bool = Field(description="a job is training its compartment now")
        learned: bool | None = Field(description="false: its training kept step 0, the compartment equals the "
                                                 "backbone (it learnt nothing from the source); null: not recorded")

    class RequestLimits(BaseModel):
        max_n: int
        max_steps: int
        per_key_queue: int = Field(description="generate requests of one key running or queued at once")

    class Me(BaseModel):
        name: str
        admin: bool
        sources: list[SourceInfo]
        weightings: list[str] = Field(description="weightings that can run on this key's ready sources (router, "
                                                  "classifier, isolated only where their heads are trained)")
        limits: RequestLimits

    @app.get("/v1/sources", tags=["generate"], response_model=Me,
             summary="The sources this key may use (an admin key: every source) and the weightings they allow")
    async def my_sources(key: keyring.ApiKey = Depends(caller)) -> dict:
        def run():
            st = engine.io.store()
            rows, ready = _source_rows()
            mine = [s for s in rows if key.may_use(s["id"])]
            return ([_source_view(s, ready, _learned(st, s["id"], ready)) for s in mine],
                    runnable_weightings(st, [s["id"] for s in mine if s["id"] in ready]))

        views, weightings = await engine.io.run(run)
        return {"name": key.name, "admin": key.admin, "sources": views, "weightings": weightings,
                "limits": {"max_n": limits.max_n, "max_steps": limits.max_steps,
                           "per_key_queue": limits.per_key_queue}}

    class GenerateRequest(BaseModel):
        model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
        sources: list[str] | None = Field(
            None, max_length=64, description="Sources to compose; default: every ready source this key may use. "
                                             "Any source outside the key's rights: 403 (never dropped); unknown: 404.")
        classes: list[int] | None = Field(
            None, max_length=limits.max_n,
            description=f"Class labels (0..{n_classes - 1}), cycled over the n images; null: unconditional.")
        n: int = Field(4, ge=1, le=limits.max_n, description="Number of images.")
        steps: int = Field(25, ge=1, le=limits.max_steps, description="Sampler steps.")
        seed: int = Field(0, ge=0, le=2**31 - 1)
        weighting: Literal[tuple(weighting_names())] = Field(
            "ito", description="How composition weights are obtained: " + "; ".join(
                f"{k}: {REGISTRY[k].help}" for k in weighting_names()) + " (router, classifier and isolated need "
                "their heads trained in the store; /v1/sources lists what the key's sources can run).")
        guidance: float = Field(2.0, ge=1.0, le=10.0, description="Classifier-free guidance (conditional only).")
        solver: Literal[tuple(SOLVERS)] | None = Field(
            None, description="Default: what the weighting needs (ddpm, the ancestral solver, for ito over several "
                              "sources), else ddim.")

    class ImageOut(BaseModel):
        index: int
        label: int | None
        png: str = Field(description="base64 PNG, 28x28 grey")
        weights: dict[str, float] = Field(description="time-averaged weight of each source for this image")
        final_weights: dict[str, float] = Field(description="weights at the last sampler call")
        attribution: dict[str, float] = Field(description="weight-path credit of each source for this image")

    class CompartmentUsed(BaseModel):
        cid: str
        weights_sha256: str | None

    class GenerateResponse(BaseModel):
        sources: list[str]
        compartments: list[CompartmentUsed]
        weighting: str
        solver: str
        steps: int
        seed: int
        n: int
        classes: list[int] | None
        guidance: float
        images: list[ImageOut]
        grid_png: str = Field(description="base64 PNG grid of all images")
        weights_summary: str
        attribution: str = Field(description="which attribution the images' `attribution` holds")
        evals: int = Field(description="(sample, compartment) denoiser evaluations in the last sampler call batch")
        seconds: float
        queue_seconds: float

    def _check_sources(key: keyring.ApiKey, requested: list[str] | None) -> list[str]:
        rows, ready = _source_rows()
        known = {s["id"] for s in rows}
        if requested is None:
            names = [s["id"] for s in rows if key.may_use(s["id"]) and s["id"] in ready]
            if not names:
                raise HTTPException(403, f"key '{key.name}' may use no ready source")
            return names
        names = list(dict.fromkeys(requested))
        if not names:
            raise HTTPException(422, "sources is empty: leave it out for every source this key may use")
        unknown = [s for s in names if s not in known]
        if unknown:
            raise HTTPException(404, f"unknown source(s): {', '.join(unknown)}")
        forbidden = [s for s in names if not key.may_use(s)]
        if forbidden:
            raise HTTPException(403, f"key '{key.name}' may not use source(s): {', '.join(forbidden)}")
        not_ready = [s for s in names if s not in ready]
        if not_ready:
            raise HTTPException(409, f"source(s) without a trained compartment yet: {', '.join(not_ready)}")
        return names

    def _resolve(token: str, key_name: str, req: GenerateRequest, st: Store) -> list[str]:
        """The sources to compose, decided when the work starts (in the compute worker, under the shared side
        of the forget lock): the key's rights and the store as they are now, not as they were at admission."""
        key = keyring.authenticate(st, token)
        if key is None:
            raise HTTPException(401, f"key '{key_name}' was revoked while the request waited",
                                headers={"WWW-Authenticate": "Bearer"})
        rows, ready = {s["id"] for s in st.sources()}, {r["cid"] for r in st.compartments(kind="compartment")}
        if req.sources is None:
            names = [s for s in sorted(rows) if key.may_use(s) and s in ready]
            if not names:
                raise HTTPException(403, f"key '{key.name}' may use no ready source")
        else:
            names = list(dict.fromkeys(req.sources))
            gone = [s for s in names if s not in rows]
            if gone:
                raise HTTPException(410, f"source(s) forgotten while the request waited: {', '.join(gone)}")
            forbidden = [s for s in names if not key.may_use(s)]
            if forbidden:
                raise HTTPException(403, f"key '{key.name}' may not use source(s): {', '.join(forbidden)}")
            not_ready = [s for s in names if s not in ready]
            if not_ready:
                raise HTTPException(409, f"source(s) without a trained compartment now: {', '.join(not_ready)}")
        resolve_solver(req.weighting, len(names), req.solver)  # the registry's rule (CdmError: 422)
        return names

    @app.post("/v1/generate", tags=["generate"], response_model=GenerateResponse,
              responses={401: {"description": "missing/unknown key"}, 403: {"description": "source outside rights"},
                         404: {"description": "unknown source"}, 409: {"description": "compartment not ready"},
                         410: {"description": "a named source was forgotten while the request waited"},
                         413: {"description": "body too large"},
                         503: {"description": "queue full, or this key's share of it"}},
              summary="Generate images from the composition of the requested sources' compartments")
    async def generate(req: GenerateRequest, request: Request, key: keyring.ApiKey = Depends(caller)) -> dict:
        t0 = time.perf_counter()
        ticket = Ticket()
        status, outcome, out = 500, "internal error", None
        try:
            if req.classes is not None:
                bad = [c for c in req.classes if not 0 <= c < n_classes]
                if bad:
                    raise HTTPException(422, f"classes {bad} are not classes of this backbone (0..{n_classes - 1})")
                if not req.classes:
                    raise HTTPException(422, "classes is empty: leave it out (null) for unconditional images")
            names = await engine.io.run(_check_sources, key, req.sources)  # fail fast; checked again at start
            resolve_solver(req.weighting, len(names), req.solver)  # fail fast, before the queue
            out = await engine.generate(key=key.name, resolve=partial(_resolve, _token_of(request), key.name, req),
                                        is_gone=request.is_disconnected, ticket=ticket, classes=req.classes,
                                        n=req.n, steps=req.steps, seed=req.seed, weighting=req.weighting,
                                        guidance=req.guidance, solver=req.solver)
            status, outcome = 200, "ok"
            return out
        except HTTPException as e:
            status, outcome = e.status_code, str(e.detail)
            raise
        except Busy as e:
            status, outcome = 503, str(e)
            raise
        except Abandoned as e:
            status, outcome = 499, f"abandoned: {e}"
            return JSONResponse({"detail": str(e)}, status_code=499)  # nobody reads it: the client is gone
        except CdmError as e:
            status, outcome = _cdm_answer(e)
            raise
        finally:
            details = {"requested": req.sources, "sources": ticket.sources, "n": req.n, "steps": req.steps,
                       "seed": req.seed, "weighting": req.weighting, "classes": req.classes, "status": status,
                       "outcome": outcome[:300], "seconds": round(time.perf_counter() - t0, 4)}
            if out is not None:
                details["queue_seconds"] = out["queue_seconds"]
            try:
                await engine.io.run(_log_generate, key.name, details)
            except asyncio.CancelledError:  # the server is stopping: log without waiting
                engine.io.executor.submit(_log_generate, key.name, details)
                raise

    # ---------------------------------------------------------------------------------------- admin: keys
    class KeyCreate(BaseModel):
        model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
        name: str = Field(min_length=1, max_length=64)
        sources: list[str] = Field(default_factory=list, max_length=1024)
        admin: bool = False

    @app.get("/v1/admin/keys", tags=["admin"], summary="List API keys (never the tokens)")
    async def list_keys(key: keyring.ApiKey = Depends(admin)) -> list[dict]:
        return [k.to_dict() for k in await engine.io.run(lambda: keyring.list_keys(engine.io.store()))]

    @app.post("/v1/admin/keys", tags=["admin"], status_code=201,
              summary="Create a key; the token is in this response only")
    async def create_key(body: KeyCreate, key: keyring.ApiKey = Depends(admin)) -> dict:
        def run():
            st = engine.io.store()
            if body.name in {k.name for k in keyring.list_keys(st)}:
                raise HTTPException(409, f"a key named '{body.name}' exists already")
            return keyring.create_key(st, body.name, sources=body.sources, admin=body.admin, actor=key.name)

        token, new = await engine.io.run(run)
        return {"token": token, **new.to_dict()}

    @app.delete("/v1/admin/keys/{name}", tags=["admin"], summary="Revoke a key")
    async def revoke_key(name: str, key: keyring.ApiKey = Depends(admin)) -> dict:
        try:
            return (await engine.io.run(lambda: keyring.revoke_key(engine.io.store(), name, actor=key.name))).to_dict()
        except keyring.ApiKeyError as e:
            raise HTTPException(404, str(e)) from None

    # ---------------------------------------------------------------------------------------- admin: sources
    @app.get("/v1/admin/sources", tags=["admin"], summary="Every source with its compartments")
    async def all_sources(key: keyring.ApiKey = Depends(admin)) -> list[dict]:
        def run():
            st = engine.io.store()
            comps = st.compartments()
            out = []
            ready = {c["cid"] for c in comps if c["kind"] == "compartment"}
            for s in st.sources():
                view = _source_view(s, ready, _learned(st, s["id"], ready))
                view["compartments"] = [{"cid": c["cid"], "kind": c["kind"], "weights_sha256": c["weights_sha256"]}
                                        for c in comps if s["id"] in c["sources"]]
                out.append(view)
            return out

        return await engine.io.run(run)

    @app.post("/v1/admin/sources", tags=["admin"], status_code=202,
              summary="Add a source from an uploaded .npz and train its compartment (a background job)")
    async def add_source(file: UploadFile = File(..., description="images uint8 N x 28 x 28, optional labels"),
                         name: str = Form(..., description="source name (letters, digits, . _ -)"),
                         tags: str = Form("", description="comma-separated access tags"),
                         steps: int | None = Form(None, description="training steps (default: the server's)"),
                         key: keyring.ApiKey = Depends(admin)) -> dict:
        from ..compartments import CompartmentConfig
        from ..data import load_npz

        try:
            check_source_name(name)  # the store's rule
        except StoreError as e:
            raise HTTPException(422, str(e)) from None
        steps = limits.default_train_steps if steps is None else steps
        if not 1 <= steps <= limits.max_train_steps:
            raise HTTPException(422, f"steps must be in 1..{limits.max_train_steps}, got {steps}")
        with tempfile.TemporaryDirectory(prefix="cdm-upload-") as tmp:
            path = Path(tmp) / "upload.npz"
            size = 0
            with open(path, "wb") as f:
                while chunk := await file.read(1 << 20):
                    size += len(chunk)
                    if size > limits.max_upload_bytes:
                        raise HTTPException(413, f"upload too large (limit {limits.max_upload_bytes} bytes)")
                    f.write(chunk)
            try:
                source = await engine.io.run(load_npz, path, id=name)
            except CdmError as e:
                raise HTTPException(422, str(e).replace(str(path), file.filename or "upload")) from None
        if len(source) > limits.max_upload_images:
            raise HTTPException(413, f"{len(source)} images; the limit is {limits.max_upload_images}")

        def prepare() -> CompartmentConfig:
            st = engine.io.store()
            if name in {s["id"] for s in st.sources()} or engine.active_job(name) is not None:
                raise HTTPException(409, f"source '{name}' exists already (forget it first to replace it)")
            existing = st.compartments(kind="compartment")
            # the new compartment matches the existing ones (prompt count, conditioning) so they compose
            base = CompartmentConfig.from_dict(st.compartment(existing[0]["cid"])["manifest"]["config"]) \
                if existing else CompartmentConfig()
            return replace(base, steps=steps, checkpoint_every=max(1, steps // 20))

        cfg = await engine.io.run(prepare)
        if cfg.conditional and source.labels is None:
            raise HTTPException(422, "the store's compartments are class-conditional: the .npz needs labels")
        if source.labels is not None and int(source.labels.max()) >= n_classes:
            raise HTTPException(422, f"label {int(source.labels.max())} but the backbone has {n_classes} classes")
        job = engine.add_source_job(source, name=name, cfg=cfg,
                                    tags=tuple(t.strip() for t in tags.split(",") if t.strip()), actor=key.name)
        return {"job": job.to_dict(), "progress_url": f"/v1/admin/jobs/{job.id}"}

    @app.delete("/v1/admin/sources/{name}", tags=["admin"],
                summary="Forget a source: its compartment, samples, joint compartments and key grants (no training)",
                description="Waits for the generate work in progress (``waited_seconds``) and holds off work that "
                            "has not started; once it returns, no answer is built from the source: queued "
                            "requests compose the remaining sources, or get 410 when they named it.")
    async def forget_source(name: str, reason: str = Query("", max_length=1000),
                            key: keyring.ApiKey = Depends(admin)) -> dict:
        from ..operations import forget_source as forget

        if engine.active_job(name) is not None:
            raise HTTPException(409, f"a job is working on source '{name}'; wait for it to finish")
        out = await engine.forgetting(lambda st: forget(st, name, reason=reason, actor=key.name))
        return {**out, "seconds": round(out["seconds"], 4)}

    class ForgetSamples(BaseModel):
        model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
        sample_ids: list[str] = Field(min_length=1, max_length=10_000,
                                      description="sample content hashes (or >= 12-character prefixes)")
        reason: str = Field("", max_length=1000)

    @app.post("/v1/admin/sources/{name}/forget-samples", tags=["admin"], status_code=202,
              summary="Forget samples of a source: exact retrain of its compartment (a background job)")
    async def forget_samples(name: str, body: ForgetSamples, key: keyring.ApiKey = Depends(admin)) -> dict:
        def check():
            engine.io.store().compartment(name)  # unknown -> 404
            if engine.active_job(name) is not None:
                raise HTTPException(409, f"a job is working on source '{name}'; wait for it to finish")

        await engine.io.run(check)
        job = engine.forget_samples_job(name, body.sample_ids, reason=body.reason, actor=key.name)
        return {"job": job.to_dict(), "progress_url": f"/v1/admin/jobs/{job.id}"}

    @app.get("/v1/admin/jobs", tags=["admin"], summary="Background jobs, newest first")
    async def jobs(key: keyring.ApiKey = Depends(admin)) -> list[dict]:
        return [j.to_dict() for j in sorted(engine.jobs.values(), key=lambda j: -j.created_at)]

    @app.get("/v1/admin/jobs/{job_id}", tags=["admin"], summary="One job's status and progress (0..1)")
    async def job(job_id: str, key: keyring.ApiKey = Depends(admin)) -> dict:
        j = engine.jobs.get(job_id)
        if j is None:
            raise HTTPException(404, f"unknown job '{job_id}'")
        return j.to_dict()

    @app.get("/v1/admin/audit", tags=["admin"], summary="The latest audit records (who, when, what)")
    async def audit(limit: int = Query(100, ge=1, le=10_000), key: keyring.ApiKey = Depends(admin)) -> list[dict]:
        return await engine.io.run(lambda: engine.io.store().audit_log(limit=limit))

    return app
