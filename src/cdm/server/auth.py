"""Who is calling: the API key a request carries, and the ``caller`` / ``admin`` dependencies of the routes
(they check the key against the store of the app's :class:`~cdm.server.engine.Engine`, ``app.state.engine``)."""

from fastapi import Depends, HTTPException, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from . import keys as keyring

__all__ = ["admin", "caller", "token_of"]

bearer = HTTPBearer(auto_error=False, description="An API key made with `cdm keys create`.")
header = APIKeyHeader(name="X-API-Key", auto_error=False, description="The same key, as a header.")


def token_of(request: Request) -> str | None:
    """The API key a request carries (X-API-Key, else Authorization: Bearer)."""
    token = request.headers.get("x-api-key")
    if not token:
        scheme, _, cred = request.headers.get("authorization", "").partition(" ")
        token = cred.strip() if scheme.lower() == "bearer" else None
    return token or None


async def caller(request: Request, cred: HTTPAuthorizationCredentials | None = Depends(bearer),
                 x_api_key: str | None = Depends(header)) -> keyring.ApiKey:
    """The live key of the request; 401 without one, or for an unknown or revoked key."""
    token = x_api_key or (cred.credentials if cred is not None else None)
    if not token:
        raise HTTPException(401, "missing API key (Authorization: Bearer <key> or X-API-Key)",
                            headers={"WWW-Authenticate": "Bearer"})
    engine = request.app.state.engine
    key = await engine.io.run(lambda: keyring.authenticate(engine.io.store(), token))
    if key is None:
        raise HTTPException(401, "unknown or revoked API key", headers={"WWW-Authenticate": "Bearer"})
    return key


async def admin(key: keyring.ApiKey = Depends(caller)) -> keyring.ApiKey:
    """The caller's key when it is an admin key; 403 otherwise."""
    if not key.admin:
        raise HTTPException(403, f"key '{key.name}' is not an admin key")
    return key
