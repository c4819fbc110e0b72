"""ASGI middleware of the service (the body limit, security headers) and the cleaning of validation errors."""

import json

from fastapi.exceptions import RequestValidationError

__all__ = ["BodyLimit", "SecurityHeaders", "validation_errors"]


class BodyLimit:
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


class SecurityHeaders:
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


def validation_errors(exc: RequestValidationError) -> list[dict]:
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
