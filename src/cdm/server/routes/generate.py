"""The sources a key may use, and generation from them: ``/v1/sources`` and ``/v1/generate``. A generate
request's sources are checked on admission (fail fast) and resolved again when its work starts."""

import asyncio
import time
from functools import partial

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import JSONResponse

from ...composition.registry import resolve_solver
from ...errors import CdmError
from ...operations import runnable_weightings
from ...store import Store
from .. import keys as keyring
from ..auth import caller, token_of
from ..context import Context
from ..engine import Abandoned, Busy, Ticket
from ..schemas import GenerateResponse, Me

__all__ = ["generate_router"]


def _pick(key: keyring.ApiKey, requested: list[str] | None, known: set[str], ready: set[str], *, missing: int,
          missing_msg: str, when: str) -> list[str]:
    """The sources to compose: the key's ready sources by default, else ``requested`` if the key may use them
    all and they are known (``missing``: the status otherwise) and trained; HTTPException otherwise."""
    if requested is None:
        names = [s for s in sorted(known) if key.may_use(s) and s in ready]
        if not names:
            raise HTTPException(403, f"key '{key.name}' may use no ready source")
        return names
    names = list(dict.fromkeys(requested))
    if not names:
        raise HTTPException(422, "sources is empty: leave it out for every source this key may use")
    gone = [s for s in names if s not in known]
    if gone:
        raise HTTPException(missing, f"{missing_msg}: {', '.join(gone)}")
    forbidden = [s for s in names if not key.may_use(s)]
    if forbidden:
        raise HTTPException(403, f"key '{key.name}' may not use source(s): {', '.join(forbidden)}")
    not_ready = [s for s in names if s not in ready]
    if not_ready:
        raise HTTPException(409, f"source(s) without a trained compartment {when}: {', '.join(not_ready)}")
    return names


def _check_sources(ctx: Context, key: keyring.ApiKey, requested: list[str] | None) -> list[str]:
    """The sources a request may compose now, at admission (in an ``io`` thread); HTTPException otherwise."""
    rows, ready = ctx.source_rows()
    return _pick(key, requested, {s["id"] for s in rows}, ready, missing=404, missing_msg="unknown source(s)",
                 when="yet")


def _resolve(token: str, key_name: str, req, st: Store) -> list[str]:
    """The sources to compose, decided when the work starts (in the compute worker, under the shared side
    of the forget lock): the key's rights and the store as they are now, not as they were at admission."""
    key = keyring.authenticate(st, token)
    if key is None:
        raise HTTPException(401, f"key '{key_name}' was revoked while the request waited",
                            headers={"WWW-Authenticate": "Bearer"})
    known, ready = {s["id"] for s in st.sources()}, {r["cid"] for r in st.compartments(kind="compartment")}
    names = _pick(key, req.sources, known, ready, missing=410,
                  missing_msg="source(s) forgotten while the request waited", when="now")
    resolve_solver(req.weighting, len(names), req.solver)  # the registry's rule (CdmError: 422)
    return names


def generate_router(ctx: Context) -> APIRouter:
    router = APIRouter()
    engine, limits, n_classes = ctx.engine, ctx.limits, ctx.n_classes
    GenerateRequest = ctx.schemas.GenerateRequest  # this app's model

    @router.get("/v1/sources", tags=["generate"], response_model=Me,
                summary="The sources this key may use (an admin key: every source) and the weightings they allow")
    async def my_sources(key: keyring.ApiKey = Depends(caller)) -> dict:
        def run():
            st = engine.io.store()
            rows, ready = ctx.source_rows()
            mine = [s for s in rows if key.may_use(s["id"])]
            return ([ctx.source_view(s, ready, ctx.learned(st, s["id"], ready)) for s in mine],
                    runnable_weightings(st, [s["id"] for s in mine if s["id"] in ready]))

        views, weightings = await engine.io.run(run)
        return {"name": key.name, "admin": key.admin, "sources": views, "weightings": weightings,
                "limits": {"max_n": limits.max_n, "max_steps": limits.max_steps,
                           "per_key_queue": limits.per_key_queue, "classes": max(n_classes, 0)}}

    @router.post("/v1/generate", tags=["generate"], response_model=GenerateResponse,
                 responses={401: {"description": "missing/unknown key"},
                            403: {"description": "source outside rights"},
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
            if req.prompt is not None and (req.classes is not None or not req.prompt.strip()):
                raise HTTPException(422, "prompt: a non-empty caption, and no classes with it")
            t_max = engine.backbone.schedule.num_train_timesteps
            if req.steps > t_max:
                raise HTTPException(422, f"steps must be at most {t_max} (the backbone's noise schedule has {t_max})")
            names = await engine.io.run(_check_sources, ctx, key, req.sources)  # fail fast; checked again at start
            resolve_solver(req.weighting, len(names), req.solver)  # fail fast, before the queue
            out = await engine.generate(key=key.name, resolve=partial(_resolve, token_of(request), key.name, req),
                                        is_gone=request.is_disconnected, ticket=ticket, classes=req.classes,
                                        prompt=req.prompt, n=req.n, steps=req.steps, seed=req.seed,
                                        weighting=req.weighting, guidance=req.guidance, solver=req.solver)
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
            status, outcome = ctx.cdm_answer(e)
            raise
        finally:
            details = {"requested": req.sources, "sources": ticket.sources, "n": req.n, "steps": req.steps,
                       "seed": req.seed, "weighting": req.weighting, "classes": req.classes, "prompt": req.prompt,
                       "status": status,
                       "outcome": outcome[:300], "seconds": round(time.perf_counter() - t0, 4)}
            if out is not None:
                details["queue_seconds"] = out["queue_seconds"]
            try:
                await engine.io.run(ctx.log_generate, key.name, details)
            except asyncio.CancelledError:  # the server is stopping: log without waiting
                engine.io.executor.submit(ctx.log_generate, key.name, details)
                raise

    return router
