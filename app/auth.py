"""Who is calling, and may it: API keys checked before a request body is read, scopes per route.

:class:`AuthMiddleware` authenticates: with a key file configured, a request to a protected
path (``/v1/*``, ``/metrics`` and the docs when the settings say so) without a valid
``Authorization: Bearer KEY`` gets 401 at once, before its upload is received. The caller is
put in ``request.state.principal``. Without a key file every caller is the anonymous tenant,
told apart by client address for rate limits.

:func:`require` authorises: a route depends on ``require("jobs")`` and a key without that scope
gets 403. The dependency also declares the bearer scheme in OpenAPI.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Awaitable, Callable

from fastapi import Depends, Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.types import ASGIApp, Receive, Scope, Send

from app.api_keys import SCOPES, ApiKey, KeyRing
from app.errors import ApiError, error_response
from app.settings import Settings
from workers.jobqueue import ANONYMOUS

REALM = 'Bearer realm="unbox"'


@dataclass(frozen=True)
class Principal:
    """The caller: the owner of the jobs it creates, its scopes and its limits."""

    owner: str  # the key's id; ANONYMOUS while keys are off
    name: str
    scopes: frozenset[str]
    client: str  # whom rate limits count: "key:<id>", or "addr:<client address>" while keys are off
    rate_limit_per_minute: int  # 0: unlimited
    max_queued_jobs: int  # 0: unlimited


def principal_of_key(key: ApiKey, settings: Settings) -> Principal:
    return Principal(owner=key.id, name=key.name, scopes=frozenset(key.scopes), client=f"key:{key.id}",
                     rate_limit_per_minute=key.rate_limit_per_minute if key.rate_limit_per_minute is not None
                     else settings.rate_limit_per_minute,
                     max_queued_jobs=key.max_queued_jobs if key.max_queued_jobs is not None
                     else settings.max_queued_jobs_per_key)


def anonymous(address: str, settings: Settings) -> Principal:
    return Principal(owner=ANONYMOUS, name=ANONYMOUS, scopes=frozenset(SCOPES), client=f"addr:{address}",
                     rate_limit_per_minute=settings.rate_limit_per_minute,
                     max_queued_jobs=settings.max_queued_jobs_per_key)


def needs_key(path: str, settings: Settings) -> bool:
    """Whether ``path`` needs a key while keys are on (one place for the whole policy)."""
    if path.startswith("/v1/") or path == "/v1":
        return True
    if path == "/metrics":
        return settings.metrics_need_key
    if path in ("/docs", "/openapi.json") or path.startswith("/docs-assets/"):
        return settings.docs_need_key
    return False  # the dashboard page and its files, /healthz, /readyz


def bearer_token(scope: Scope) -> str | None:
    """The token of an ``Authorization: Bearer`` header, ``None`` when absent or another scheme."""
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").strip().partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token.strip() else None
    return None


class AuthMiddleware:
    """Authenticates every request (ASGI, so a refused upload is never read)."""

    def __init__(self, app: ASGIApp, settings: Settings, keyring: KeyRing | None) -> None:
        self.app = app
        self.settings = settings
        self.keyring = keyring

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        if self.keyring is None:
            client = scope.get("client")
            state["principal"] = anonymous(client[0] if client else "unknown", self.settings)
        elif needs_key(scope["path"], self.settings):
            token = bearer_token(scope)
            key = self.keyring.lookup(token) if token else None
            if key is None:
                await _refusal(token is not None)(scope, receive, send)
                return
            state["principal"] = principal_of_key(key, self.settings)
        await self.app(scope, receive, send)


def _refusal(had_token: bool) -> JSONResponse:
    """A 401 in the error envelope, with the challenge RFC 6750 asks for."""
    if had_token:
        return error_response(401, "unauthorized", "the API key is invalid or revoked",
                              {"WWW-Authenticate": REALM + ', error="invalid_token"'})
    return error_response(401, "unauthorized", "this server needs an API key: send Authorization: Bearer KEY",
                          {"WWW-Authenticate": REALM})


_bearer = HTTPBearer(auto_error=False, scheme_name="ApiKey",
                     description="An Unbox API key (`unbox keys add NAME`), when the server has "
                                 "UNBOX_API_KEYS_FILE set: `Authorization: Bearer ubx_...`")


def require(scope: str | None = None) -> Callable[..., Awaitable[Principal | None]]:
    """A dependency that lets through callers holding ``scope`` (any authenticated caller when
    ``None``); a route the middleware left open (no principal) is open to all."""

    async def authorise(request: Request,
                        _credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> Principal | None:
        principal: Principal | None = getattr(request.state, "principal", None)
        if principal is not None and scope is not None and scope not in principal.scopes:
            raise ApiError(403, "insufficient_scope", f"this API key lacks the {scope!r} scope",
                           {"WWW-Authenticate": f'{REALM}, error="insufficient_scope", scope="{scope}"'})
        return principal

    return authorise


def caller_of(request: Request) -> Principal:
    """The authenticated caller of a ``/v1`` route (set by :class:`AuthMiddleware`)."""
    principal: Principal | None = getattr(request.state, "principal", None)
    if principal is None:  # only when a /v1 route is mounted without the middleware
        raise ApiError(401, "unauthorized", "no caller", {"WWW-Authenticate": REALM})
    return principal
