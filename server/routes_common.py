"""Pieces every route module shares: the per-app context, API errors, engine calls with
cancellation on client disconnect, and the SSE response."""

from __future__ import annotations

import asyncio
import json
import math
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel
from starlette.responses import StreamingResponse

from adapters.names import AdapterNameError
from adapters.store import AdapterNotFoundError, StoreCorruptError
from adapters.validation import AdapterValidationError
from server.metrics import UNKNOWN_LABEL, ServerMetrics, adapter_label
from server.types import (EngineClosedError, EngineError, EngineOverloadedError, GenerationRequest,
                          GenerationResult, InvalidRequestError, SamplingParams)

MIN_LOGPROB = -9999.0   # what OpenAI reports for impossible tokens; JSON has no -inf


@dataclass
class ServerSettings:
    admin_token: str | None = None         # None or "" = admin routes off
    max_body_bytes: int = 4 << 20          # JSON request bodies
    max_upload_bytes: int = 64 << 20       # adapter uploads (PUT /admin/adapters/{name})
    default_max_new_tokens: int = 256      # when a request names no limit (capped by the context)
    retry_after_s: int = 1                 # Retry-After on 503 when the queue is full
    model_id: str | None = None            # OpenAI id of the base model; None = the loaded model's name


@dataclass
class ServerContext:
    engine: Any                            # server.engine.Engine
    registry: Any                          # adapters.registry.AdapterRegistry | None
    loaded: Any                            # model.loading.LoadedModel
    settings: ServerSettings
    metrics: ServerMetrics
    model_id: str
    ready: bool = False
    created: int = 0                       # unix time the app was built (OpenAI `created`)

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    @property
    def max_seq_len(self) -> int:
        return self.engine.max_seq_len


def get_ctx(request: Request) -> ServerContext:
    return request.app.state.ctx


class ApiError(Exception):
    """An error answer; rendered as TGI's or OpenAI's error shape depending on the route."""

    def __init__(self, status: int, message: str, kind: str, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param
        self.headers = headers or {}


class ClientDisconnected(Exception):
    """The client went away before the answer was ready (recorded as status 499)."""


def engine_error(e: Exception, settings: ServerSettings, validation_status: int = 422,
                 field_names: dict[str, str] | None = None) -> ApiError:
    """Translate what `engine.submit` / `handle.result` raise into an HTTP answer.

    `field_names` maps the engine's parameter names to the wire format's (max_new_tokens →
    max_tokens ...), so the error names the field the client actually sent."""
    if isinstance(e, (AdapterNotFoundError, AdapterNameError)):
        return ApiError(404, e.args[0] if e.args else str(e), "not_found", "adapter")
    if isinstance(e, AdapterValidationError):   # stored, but unusable with this base model
        return ApiError(422, str(e), "validation", "adapter")
    if isinstance(e, InvalidRequestError):
        field = (field_names or {}).get(e.field, e.field)
        return ApiError(validation_status, f"{field}: {e.message}", "validation", field)
    if isinstance(e, EngineOverloadedError):
        return ApiError(503, f"server overloaded, retry later: {e}", "overloaded",
                        headers={"Retry-After": str(settings.retry_after_s)})
    if isinstance(e, EngineClosedError):
        return ApiError(503, f"server is shutting down: {e}", "unavailable",
                        headers={"Retry-After": str(settings.retry_after_s)})
    if isinstance(e, (EngineError, StoreCorruptError)):
        return ApiError(500, f"generation failed: {e}", "generation")
    raise e


def encode_prompt(ctx: ServerContext, text: str, add_bos: bool | None = None) -> list[int]:
    ids = ctx.tokenizer.encode(text, add_bos=add_bos)
    if not ids:
        raise InvalidRequestError("prompt", "the prompt encodes to zero tokens")
    return ids


def resolve_max_new_tokens(ctx: ServerContext, requested: int | None, prompt_len: int) -> int:
    """A request without a limit gets the server default, capped by the room left in the context."""
    if requested is not None:
        return requested
    return max(1, min(ctx.settings.default_max_new_tokens, ctx.max_seq_len - prompt_len))


async def acquire_adapter(ctx: ServerContext, requested: str | None):
    """'name' or 'name@N' → a lease on the exact version to serve (None = base model), or a 404.

    Pinning the version here means everything said about the request (metrics label,
    system_fingerprint) names the version that actually serves it, even if an upload lands
    before the engine runs it. The lease is taken in a worker thread: loading a version not yet
    on the device (reading its file, computing its K/V) never stalls the event loop."""
    if requested is None:
        return None
    if ctx.registry is None:
        raise ApiError(404, f"adapter {requested!r} not found: this server has no adapter store",
                       "not_found", "adapter")
    try:
        return await run_in_threadpool(ctx.registry.acquire, requested)
    except (AdapterNotFoundError, AdapterNameError, AdapterValidationError, StoreCorruptError) as e:
        raise engine_error(e, ctx.settings) from None


# The lease start_counted acquired, handed to the first submit() of the call it builds (routes
# build their calls without knowing about leases); whatever is left is released afterwards.
_pending_lease: ContextVar[list | None] = ContextVar("pending_lease", default=None)


def request_label(requested: str | None) -> str:
    """Metrics label before the adapter is resolved: unknown names must not become label values
    (anyone could otherwise create unbounded series)."""
    return adapter_label(None) if requested is None else UNKNOWN_LABEL


def submit(ctx: ServerContext, prompt_ids: list[int], params: SamplingParams, adapter_ref: str | None,
           validation_status: int = 422, field_names: dict[str, str] | None = None):
    """Validate and enqueue (the engine validates); raise ApiError for anything the caller did
    wrong or overload. The adapter lease start_counted holds, if any, goes to the engine."""
    pending = _pending_lease.get()
    lease = pending.pop() if pending else None
    try:
        return ctx.engine.submit(GenerationRequest(prompt_ids, params, adapter=adapter_ref), lease=lease)
    except (AdapterNotFoundError, AdapterNameError, AdapterValidationError, InvalidRequestError,
            EngineOverloadedError, EngineClosedError, EngineError, StoreCorruptError) as e:
        raise engine_error(e, ctx.settings, validation_status, field_names) from None


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def result_unless_disconnected(request: Request, handle) -> GenerationResult:
    """Await a non-streamed result; if the client hangs up first (or this task is cancelled,
    e.g. at shutdown), cancel the request so its slot is freed."""
    result_task = asyncio.ensure_future(handle.result())
    disconnect_task = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({result_task, disconnect_task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        disconnect_task.cancel()
        abandoned = not result_task.done()
        if abandoned:
            handle.cancel()
            result_task.cancel()
    if abandoned:
        raise ClientDisconnected()
    return result_task.result()


def finite_logprob(x: float) -> float:
    return max(float(x), MIN_LOGPROB) if not math.isnan(x) else MIN_LOGPROB


def sse(payload: BaseModel | dict | str) -> str:
    if isinstance(payload, BaseModel):
        payload = payload.model_dump_json(exclude_none=False)
    elif isinstance(payload, dict):
        payload = json.dumps(payload, ensure_ascii=False)
    return f"data: {payload}\n\n"


class EngineEventStream(StreamingResponse):
    """SSE response whose body generator is always closed when the response ends, however it
    ends (done, client disconnect, server shutdown), so its `finally` cancels the engine request
    and records metrics deterministically rather than whenever the generator is collected."""

    media_type = "text/event-stream"

    def __init__(self, body: AsyncIterator[str], on_close: Callable[[], None] | None = None):
        super().__init__(body, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._body = body
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._body.aclose()
            if self._on_close is not None:
                self._on_close()


async def start_counted(ctx: ServerContext, endpoint: str, requested: str | None, make_call: Callable[[str | None], Any]):
    """Resolve the adapter, build the route's call and submit it → (call, handle, metrics label).

    A refusal (unknown adapter, bad parameter, overload) is counted in the metrics and re-raised.
    """
    label = request_label(requested)
    pending: list = []
    token = _pending_lease.set(pending)
    try:
        lease = await acquire_adapter(ctx, requested)
        adapter_ref = lease.ref if lease is not None else None
        if lease is not None:
            pending.append(lease)
        label = adapter_label(adapter_ref)
        call = make_call(adapter_ref)
        return call, call.submit(), label
    except ApiError as e:
        ctx.metrics.observe_request(endpoint, e.status, label)
        raise
    finally:
        _pending_lease.reset(token)
        for lease in pending:       # the call failed before submitting: nobody took it
            lease.release()


async def counted_answer(request: Request, ctx: ServerContext, endpoint: str, label: str, handle,
                         respond: Callable[[GenerationResult], BaseModel]) -> BaseModel:
    """Wait for a non-streamed result and shape it with `respond`; every outcome is counted once."""
    try:
        try:
            result = await result_unless_disconnected(request, handle)
        except EngineError as e:
            raise engine_error(e, ctx.settings) from None
        answer = respond(result)
    except ApiError as e:
        ctx.metrics.observe_request(endpoint, e.status, label)
        raise
    except ClientDisconnected:
        ctx.metrics.observe_request(endpoint, 499, label)
        raise
    ctx.metrics.observe_request(endpoint, 200, label)
    return answer
