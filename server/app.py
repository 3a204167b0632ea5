"""The FastAPI app: a thin translation layer over the engine.

    app = create_app(engine, registry, loaded, ServerSettings(admin_token=...))

The engine's lifecycle belongs to the caller (`server.serve` starts it before uvicorn and shuts
it down after); the app only marks itself ready between its own startup and shutdown.
"""

from __future__ import annotations

import time
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from server import admin, routes_openai, routes_tgi
from server.api_keys import ApiKeys
from server.auth import ReleaseSlots, inference_key
from server.metrics import CONTENT_TYPE, ServerMetrics
from server.routes_common import ApiError, ClientDisconnected, ServerContext, ServerSettings, get_ctx
from server.routes_openai import openai_error_body
from server.schemas_openai import ErrorResponse
from server.schemas_tgi import TGIError

__all__ = ["create_app", "ServerSettings"]


def _is_openai(path: str) -> bool:
    return path.startswith("/v1/")


def _error_response(path: str, err: ApiError) -> JSONResponse:
    if _is_openai(path):
        body = openai_error_body(err).model_dump()
    else:
        body = {"error": err.message, "error_type": err.kind}
    return JSONResponse(body, status_code=err.status, headers=err.headers)


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
    """413 for bodies over the limit (uploads have their own, larger one), checked before any
    route reads them; chunked bodies are counted as they arrive and replayed to the app."""

    def __init__(self, app: ASGIApp, max_body: int, max_upload: int):
        self.app, self.max_body, self.max_upload = app, max_body, max_upload

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        path = scope["path"]
        is_upload = path.startswith("/admin/")
        limit = self.max_upload if is_upload else self.max_body
        what = "upload" if is_upload else "request body"
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await self._too_large(path, what, limit, scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                return await self._too_large(path, what, limit, scope, receive, send)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()   # after the body: wait for the client to disconnect

        await self.app(scope, replay, send)

    @staticmethod
    async def _too_large(path, what, limit, scope, receive, send) -> None:
        err = ApiError(413, f"{what} larger than {limit} bytes", "too_large")
        await _error_response(path, err)(scope, receive, send)


def create_app(engine, registry, loaded, settings: ServerSettings | None = None) -> FastAPI:
    settings = settings or ServerSettings()
    pool_stats = registry.stats if registry is not None else None
    ctx = ServerContext(engine=engine, registry=registry, loaded=loaded, settings=settings,
                        metrics=ServerMetrics(engine.stats, pool_stats),
                        model_id=settings.model_id or loaded.name, created=int(time.time()),
                        auth=ApiKeys(settings.api_keys, settings.api_keys_file))
    engine.add_completion_callback(ctx.metrics.observe_result)
    engine.add_completion_callback(ctx.auth.on_result)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        ctx.ready = True
        yield
        ctx.ready = False   # /ready fails while uvicorn drains in-flight requests

    app = FastAPI(title="llama-adapter-server", version="0.1.0", lifespan=lifespan,
                  description="One frozen LLaMA, many hot-swappable LLaMA-Adapter adapters. "
                              "TGI/LoRAX and OpenAI-compatible generation, admin adapter upload, metrics.")
    app.state.ctx = ctx

    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, exc: ApiError):
        return _error_response(request.url.path, exc)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError):
        message, field = _validation_message(exc)
        status = 400 if _is_openai(request.url.path) else 422
        return _error_response(request.url.path, ApiError(status, message, "validation", field))

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
        if c.ready:
            return {"status": "ready", "model": c.model_id}
        return JSONResponse({"status": "not ready", "model": c.model_id}, status_code=503)

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
    app.add_middleware(BodySizeLimit, max_body=settings.max_body_bytes, max_upload=settings.max_upload_bytes)
    return app
