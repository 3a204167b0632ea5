"""The FastAPI app: a thin translation layer over the engine.

    app = create_app(engine, registry, loaded, ServerSettings(admin_token=...))

The engine's lifecycle belongs to the caller (`server.serve` starts it before uvicorn and shuts
it down after); the app only marks itself ready between its own startup and shutdown.
"""

from __future__ import annotations

import re
import tempfile
import time
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from server import admin, routes_openai, routes_tgi
from server.api_keys import ApiKeys
from server.auth import ReleaseSlots, admin_refusal, inference_key
from server.metrics import CONTENT_TYPE, ServerMetrics
from server.routes_common import (ApiError, ClientDisconnected, ServerContext, ServerSettings, error_response,
                                  get_ctx, is_openai_path)
from server.schemas_openai import ErrorResponse
from server.schemas_tgi import TGIError

__all__ = ["create_app", "ServerSettings"]


# The kind of error each status Starlette itself raises stands for (unknown route, bad method...).
_HTTP_KINDS = {400: "validation", 401: "auth", 403: "auth", 404: "not_found", 405: "method_not_allowed",
               413: "too_large", 422: "validation"}
_UPLOAD_ROUTE = re.compile(r"/admin/adapters/[^/]+")
_SPOOL_BYTES = 1 << 20     # bodies up to this stay in memory; larger ones go to a temporary file


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """First problem as 'field.path: message', and the field path (for OpenAI's `param`)."""
    problems = []
    first_field = None
    for e in exc.errors():
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        field = ".".join(loc) or "body"
        first_field = first_field or field
        problems.append(f"{field}: {e.get('msg', 'invalid')}")
    return "; ".join(problems) or "invalid request", first_field


class BodySizeLimit:
    """Checks made before any body is read: admin credentials (a 401/403 for an anonymous
    upload costs nothing), then 413 for bodies over the limit (only the upload route has the
    larger upload limit); chunked bodies are counted as they arrive, spooled, and replayed to the app."""

    def __init__(self, app: ASGIApp, settings: ServerSettings):
        self.app, self.settings = app, settings
        self.max_body, self.max_upload = settings.max_body_bytes, settings.max_upload_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        path = scope["path"]
        if path.startswith("/admin/"):
            refused, _ = admin_refusal(scope["app"].state.ctx, _header(scope, b"authorization"))
            if refused is not None:
                return await error_response(path, refused)(scope, receive, send)
        is_upload = scope["method"] == "PUT" and _UPLOAD_ROUTE.fullmatch(path) is not None
        limit = self.max_upload if is_upload else self.max_body
        what = "upload" if is_upload else "request body"
        declared = _header(scope, b"content-length").encode()
        if declared.isdigit() and int(declared) > limit:
            return await self._too_large(path, what, limit, scope, receive, send)
        # Spooled: a large upload (a LoRA can be hundreds of MB) goes to a temporary file as it
        # arrives instead of staying in memory.
        body = tempfile.SpooledTemporaryFile(max_size=_SPOOL_BYTES)
        try:
            size = 0
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    return await self._too_large(path, what, limit, scope, receive, send)
                body.write(chunk)
                if not message.get("more_body", False):
                    break
            body.seek(0)
            done = False

            async def replay() -> dict:
                nonlocal done
                if not done:
                    chunk = body.read(_SPOOL_BYTES)
                    done = body.tell() >= size
                    return {"type": "http.request", "body": chunk, "more_body": not done}
                return await receive()   # after the body: wait for the client to disconnect

            await self.app(scope, replay, send)
        finally:
            body.close()

    @staticmethod
    async def _too_large(path, what, limit, scope, receive, send) -> None:
        err = ApiError(413, f"{what} larger than {limit} bytes", "too_large")
        await error_response(path, err)(scope, receive, send)


def _header(scope: Scope, name: bytes) -> str:
    return dict(scope["headers"]).get(name, b"").decode("latin-1")


def create_app(engine, registry, loaded, settings: ServerSettings | None = None) -> FastAPI:
    settings = settings or ServerSettings()
    pool_stats = registry.stats if registry is not None else None
    cache_failures = (lambda: registry.kv_cache_write_failures) if registry is not None else None
    ctx = ServerContext(engine=engine, registry=registry, loaded=loaded, settings=settings,
                        metrics=ServerMetrics(engine.stats, pool_stats, cache_failures),
                        model_id=settings.model_id or loaded.name, created=int(time.time()),
                        auth=ApiKeys(settings.api_keys, settings.api_keys_file))
    engine.add_completion_callback(ctx.metrics.observe_result)
    engine.add_completion_callback(ctx.auth.on_result)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        ctx.ready = True
        yield
        ctx.ready = False   # /ready fails from here on (draining, see serve.py, turned it 503 earlier)

    # No trailing-slash redirects: Starlette builds their Location from the client's Host header.
    app = FastAPI(title="llama-adapter-server", version="0.1.0", lifespan=lifespan, redirect_slashes=False,
                  description="One frozen LLaMA, many hot-swappable LLaMA-Adapter adapters. "
                              "TGI/LoRAX and OpenAI-compatible generation, admin adapter upload, metrics.")
    app.state.ctx = ctx

    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, exc: ApiError):
        return error_response(request.url.path, exc)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError):
        message, field = _validation_message(exc)
        status = 400 if is_openai_path(request.url.path) else 422
        return error_response(request.url.path, ApiError(status, message, "validation", field))

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException):
        # FastAPI's own 400 for a body that is not JSON (bad UTF-8, nesting too deep) says so vaguely.
        message = ("request body is not valid JSON (UTF-8, nested at most a few hundred levels)"
                   if exc.status_code == 400 else str(exc.detail))
        kind = _HTTP_KINDS.get(exc.status_code, "generation" if exc.status_code >= 500 else "validation")
        return error_response(request.url.path, ApiError(exc.status_code, message, kind,
                                                         headers=getattr(exc, "headers", None)))

    @app.exception_handler(Exception)
    async def on_bug(request: Request, exc: Exception):
        # Starlette still logs the traceback; the client gets the documented shape, not text/plain.
        return error_response(request.url.path, ApiError(500, f"internal error: {type(exc).__name__}",
                                                         "generation"))

    @app.exception_handler(ClientDisconnected)
    async def on_client_gone(request: Request, exc: ClientDisconnected):
        return Response(status_code=499)   # nobody reads it; logs show why the request ended

    @app.get("/health", tags=["ops"])
    async def health() -> dict:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/ready", tags=["ops"], responses={503: {"description": "not ready"}})
    async def ready(c: ServerContext = Depends(get_ctx)):
        """Readiness: model loaded, engine started, not shutting down."""
        if c.ready and not c.draining:
            return {"status": "ready", "model": c.model_id}
        status = "draining" if c.draining else "not ready"
        return JSONResponse({"status": status, "model": c.model_id}, status_code=503)

    @app.get("/metrics", tags=["ops"], response_class=Response,
             responses={200: {"content": {CONTENT_TYPE: {}}}})
    async def metrics(c: ServerContext = Depends(get_ctx)):
        """Prometheus exposition."""
        return Response(c.metrics.render(), media_type=CONTENT_TYPE)

    # Inference needs an API key when keys are configured; health, readiness and metrics never do.
    for router, error_model in ((routes_tgi.router, TGIError), (routes_openai.router, ErrorResponse)):
        app.include_router(router, dependencies=[Depends(inference_key)],
                           responses={401: {"model": error_model}, 429: {"model": error_model}})
    app.include_router(admin.router)
    app.add_middleware(ReleaseSlots)
    app.add_middleware(BodySizeLimit, settings=settings)
    return app
