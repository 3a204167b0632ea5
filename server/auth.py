"""HTTP side of API keys (server/api_keys.py): FastAPI dependencies for the inference and admin
routes, and the adapter checks the routes call.

* Inference (TGI, OpenAI): with keys configured every request needs `Authorization: Bearer
  <key>` (401 without one or with a wrong one); a key over its limits gets 429 + Retry-After;
  an adapter the key may not use is a 404 worded exactly like an adapter that does not exist.
  Without keys configured inference is open, as before.
* Admin: `--admin-token` is the global admin; a keys-file entry with `admin = true` is a tenant
  admin that lists, shows, uploads and deletes only adapters matching its patterns.

The dependencies put the caller in `api_keys.current_caller` for the rest of the request: the
routes check adapters with `api_keys.check_adapter`, and the metrics' tenant label and the
engine request's `tenant` come from it. The concurrency slot a request takes is given back by
`ReleaseSlots` once its response is fully sent, streams included.
"""

from __future__ import annotations

import hmac

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.types import ASGIApp, Receive, Scope, Send

from server.api_keys import ApiKeys, Caller, RateLimited, current_caller
from server.routes_common import ApiError, ServerContext, get_ctx

ADMIN_ENV_HINT = "start the server with --admin-token or ADAPTER_SERVER_ADMIN_TOKEN"
_SLOTS = "adapter_server.release"     # scope key: callbacks run after the response is sent
# Only declares the scheme in the OpenAPI schema; `_bearer_token` reads the header for both kinds.
_bearer = HTTPBearer(auto_error=False, description="an inference API key (when the server has keys)")


def _bearer_token(request: Request) -> str | None:
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        return None
    return given.strip() or None


def _unauthorized(message: str) -> ApiError:
    return ApiError(401, message, "auth", headers={"WWW-Authenticate": "Bearer"})


async def inference_key(request: Request, _: HTTPAuthorizationCredentials | None = Depends(_bearer),
                        ctx: ServerContext = Depends(get_ctx)) -> None:
    """Router dependency of the inference routes (async: it must run in the request's own
    context for `current_caller` to reach the route)."""
    keys: ApiKeys = ctx.auth
    current_caller.set(None)
    if not keys.configured:
        return
    given = _bearer_token(request)
    if given is None:
        ctx.metrics.auth_rejected.labels("", "missing_key").inc()
        raise _unauthorized("API key required: send 'Authorization: Bearer <key>'")
    caller = keys.lookup(given, admin=False)
    if caller is None:
        ctx.metrics.auth_rejected.labels("", "invalid_key").inc()
        raise _unauthorized("invalid API key")
    try:
        caller.usage.admit(caller.entry, ctx.settings.retry_after_s)
    except RateLimited as e:
        ctx.metrics.auth_rejected.labels(caller.tenant, e.limit).inc()
        raise ApiError(429, str(e), "rate_limited", headers={"Retry-After": str(e.retry_after_s)}) from None
    _after_response(request, caller.usage.release)
    current_caller.set(caller)


def _after_response(request: Request, fn) -> None:
    request.scope[_SLOTS].append(fn)   # create_app installs ReleaseSlots


class ReleaseSlots:
    """Runs the callbacks the auth dependency registered once the app has finished with the
    request: after the last byte of a stream, a client that went away, or an error."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        scope[_SLOTS] = callbacks = []
        try:
            await self.app(scope, receive, send)
        finally:
            for fn in callbacks:
                fn()


def admin_refusal(ctx: ServerContext, authorization: str) -> tuple[ApiError | None, Caller | None]:
    """Whether an Authorization header value opens /admin: (the refusal, None) or (None, the
    tenant admin, or None for the global token). Pure, so the app's middleware can check it
    before any body is read and the routes' dependency again with the request."""
    keys: ApiKeys = ctx.auth
    tenant_admins = keys.keys_file is not None
    if not ctx.settings.admin_token and not tenant_admins:
        return ApiError(403, f"the admin API is disabled: {ADMIN_ENV_HINT}", "auth"), None
    scheme, _, given = authorization.partition(" ")
    given = given.strip()
    if scheme.lower() != "bearer" or not given:
        return _unauthorized("admin token required: send 'Authorization: Bearer <token>'"), None
    token = ctx.settings.admin_token
    if token and hmac.compare_digest(given.encode(), token.encode()):
        return None, None
    caller: Caller | None = keys.lookup(given, admin=True) if tenant_admins else None
    if caller is None:
        return ApiError(403, "admin token rejected", "auth"), None
    return None, caller


async def admin_caller(request: Request, ctx: ServerContext) -> None:
    """Authenticate an /admin request: the global token (every adapter) or a tenant admin key
    (its patterns only, via `current_caller`). 401 without a token, 403 for a wrong one."""
    current_caller.set(None)
    refused, caller = admin_refusal(ctx, request.headers.get("authorization", ""))
    if refused is not None:
        raise refused
    current_caller.set(caller)


def check_admin_upload(name: str) -> None:
    """A tenant admin uploads only names matching its patterns (403: the name is its choice)."""
    caller = current_caller.get()
    if caller is not None and not caller.entry.may_use(name):
        raise ApiError(403, f"this admin key manages only adapters matching "
                            f"{', '.join(caller.entry.adapters) or '(none)'}", "auth", "name")
