"""Admin key only: API keys, sources (list, add from an upload, forget, forget samples), jobs, the audit log."""

import tempfile
from dataclasses import replace
from pathlib import Path

from fastapi import APIRouter, Depends, File, Form, HTTPException, Query, UploadFile

from ...errors import CdmError
from ...store import StoreError, check_source_name
from .. import keys as keyring
from ..auth import admin
from ..context import Context
from ..schemas import ForgetSamples, KeyCreate

__all__ = ["admin_router"]


def admin_router(ctx: Context) -> APIRouter:
    router = APIRouter()
    engine, limits, n_classes = ctx.engine, ctx.limits, ctx.n_classes

    # ---------------------------------------------------------------------------------------- keys
    @router.get("/v1/admin/keys", tags=["admin"], summary="List API keys (never the tokens)")
    async def list_keys(key: keyring.ApiKey = Depends(admin)) -> list[dict]:
        return [k.to_dict() for k in await engine.io.run(lambda: keyring.list_keys(engine.io.store()))]

    @router.post("/v1/admin/keys", tags=["admin"], status_code=201,
                 summary="Create a key; the token is in this response only")
    async def create_key(body: KeyCreate, key: keyring.ApiKey = Depends(admin)) -> dict:
        def run():
            st = engine.io.store()
            if body.name in {k.name for k in keyring.list_keys(st)}:
                raise HTTPException(409, f"a key named '{body.name}' exists already")
            return keyring.create_key(st, body.name, sources=body.sources, tags=body.tags, admin=body.admin,
                                      actor=key.name)

        token, new = await engine.io.run(run)
        return {"token": token, **new.to_dict()}

    @router.delete("/v1/admin/keys/{name}", tags=["admin"], summary="Revoke a key")
    async def revoke_key(name: str, key: keyring.ApiKey = Depends(admin)) -> dict:
        try:
            return (await engine.io.run(lambda: keyring.revoke_key(engine.io.store(), name, actor=key.name))).to_dict()
        except keyring.ApiKeyError as e:
            raise HTTPException(404, str(e)) from None

    # ---------------------------------------------------------------------------------------- sources
    @router.get("/v1/admin/sources", tags=["admin"], summary="Every source with its compartments")
    async def all_sources(key: keyring.ApiKey = Depends(admin)) -> list[dict]:
        def run():
            st = engine.io.store()
            comps = st.compartments()
            out = []
            ready = {c["cid"] for c in comps if c["kind"] == "compartment"}
            for s in st.sources():
                view = ctx.source_view(s, ready, ctx.learned(st, s["id"], ready))
                view["compartments"] = [{"cid": c["cid"], "kind": c["kind"], "weights_sha256": c["weights_sha256"]}
                                        for c in comps if s["id"] in c["sources"]]
                out.append(view)
            return out

        return await engine.io.run(run)

    @router.post("/v1/admin/sources", tags=["admin"], status_code=202,
                 summary="Add a source from an uploaded .npz and train its compartment (a background job)")
    async def add_source(file: UploadFile = File(..., description="images uint8 N x H x W (grey) or N x H x W x 3 "
                                                         "(RGB), optional labels; fitted to the backbone's images"),
                         name: str = Form(..., description="source name (letters, digits, . _ -)"),
                         tags: str = Form("", description="comma-separated access tags"),
                         steps: int | None = Form(None, description="training steps (default: the server's)"),
                         key: keyring.ApiKey = Depends(admin)) -> dict:
        from ...compartments import CompartmentConfig
        from ...data import fit, load_npz

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
        source = await engine.io.run(fit, source, engine.backbone.codec.spec)  # the backbone's size and channels

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

    @router.delete("/v1/admin/sources/{name}", tags=["admin"],
                   summary="Forget a source: its compartment, samples, joint compartments and key grants (no training)",
                   description="Waits for the generate work in progress (``waited_seconds``) and holds off work "
                               "that has not started; once it returns, no answer is built from the source: queued "
                               "requests compose the remaining sources, or get 410 when they named it.")
    async def forget_source(name: str, reason: str = Query("", max_length=1000),
                            key: keyring.ApiKey = Depends(admin)) -> dict:
        from ...operations import forget_source as forget

        if engine.active_job(name) is not None:
            raise HTTPException(409, f"a job is working on source '{name}'; wait for it to finish")
        out = await engine.forgetting(lambda st: forget(st, name, reason=reason, actor=key.name))
        return {**out, "seconds": round(out["seconds"], 4)}

    @router.post("/v1/admin/sources/{name}/forget-samples", tags=["admin"], status_code=202,
                 summary="Forget samples of a source: exact retrain of its compartment (a background job)")
    async def forget_samples(name: str, body: ForgetSamples, key: keyring.ApiKey = Depends(admin)) -> dict:
        def check():
            engine.io.store().compartment(name)  # unknown -> 404
            if engine.active_job(name) is not None:
                raise HTTPException(409, f"a job is working on source '{name}'; wait for it to finish")

        await engine.io.run(check)
        job = engine.forget_samples_job(name, body.sample_ids, reason=body.reason, actor=key.name)
        return {"job": job.to_dict(), "progress_url": f"/v1/admin/jobs/{job.id}"}

    # ---------------------------------------------------------------------------------------- jobs, audit
    @router.get("/v1/admin/jobs", tags=["admin"], summary="Background jobs, newest first")
    async def jobs(key: keyring.ApiKey = Depends(admin)) -> list[dict]:
        return [j.to_dict() for j in sorted(engine.jobs.values(), key=lambda j: -j.created_at)]

    @router.get("/v1/admin/jobs/{job_id}", tags=["admin"], summary="One job's status and progress (0..1)")
    async def job(job_id: str, key: keyring.ApiKey = Depends(admin)) -> dict:
        j = engine.jobs.get(job_id)
        if j is None:
            raise HTTPException(404, f"unknown job '{job_id}'")
        return j.to_dict()

    @router.get("/v1/admin/audit", tags=["admin"], summary="The latest audit records (who, when, what)")
    async def audit(limit: int = Query(100, ge=1, le=10_000), key: keyring.ApiKey = Depends(admin)) -> list[dict]:
        return await engine.io.run(lambda: engine.io.store().audit_log(limit=limit))

    return router
