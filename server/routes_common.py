"""Pieces every route module shares: the per-app context, API errors, engine calls with
cancellation on client disconnect, and the SSE response."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import threading
from contextvars import ContextVar
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, AsyncIterator, Callable

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.responses import StreamingResponse

from adapters.names import AdapterNameError
from adapters.store import AdapterNotFoundError, StoreCorruptError
from adapters.validation import AdapterValidationError
from server.api_keys import check_adapter, current_tenant
from server.metrics import UNKNOWN_LABEL, ServerMetrics, adapter_label
from server.schemas_openai import ErrorResponse
from server.schemas_tgi import TGIError
from server.types import (EngineClosedError, EngineError, EngineOverloadedError, GenerationRequest,
                          GenerationResult, ImageInput, InvalidRequestError, SamplingParams, TokenEvent,
                          check_text)

log = logging.getLogger(__name__)
MIN_LOGPROB = -9999.0   # what OpenAI reports for impossible tokens; JSON has no -inf
SHUTTING_DOWN = "the server is shutting down"


@dataclass
class ServerSettings:
    admin_token: str | None = None         # None or "" = admin routes off
    max_body_bytes: int = 4 << 20          # JSON request bodies
    max_upload_bytes: int = 2048 << 20     # adapter uploads (PUT /admin/adapters/{name}); LoRAs are large
    default_max_new_tokens: int = 256      # when a request names no limit (capped by the context)
    max_new_tokens_limit: int | None = None  # most new tokens one request may ask for; None = the context
    request_timeout_s: float | None = None   # submit → finish deadline per request; None = none
    retry_after_s: int = 1                 # Retry-After on 503 when the queue is full
    model_id: str | None = None            # OpenAI id of the base model; None = the loaded model's name
    api_keys: tuple[str, ...] = ()         # inference keys (tenant "default", every adapter)
    api_keys_file: str | None = None       # keys file (server/api_keys.py); no keys at all = open inference
    # Image inputs (server/images.py)
    max_image_bytes: int = 8 << 20         # one image's encoded bytes
    max_image_pixels: int = 4096 * 4096    # width × height, read from the header before decoding
    allow_remote_images: bool = False      # fetch http(s) image URLs (else only data: URLs)
    remote_image_timeout_s: float = 10.0   # a remote image's whole transfer


@dataclass
class ServerContext:
    engine: Any                            # server.engine.Engine
    registry: Any                          # adapters.registry.AdapterRegistry | None
    loaded: Any                            # model.loading.LoadedModel
    settings: ServerSettings
    metrics: ServerMetrics
    model_id: str
    ready: bool = False
    draining: bool = False                 # shutting down: /ready is 503, no new generation requests
    created: int = 0                       # unix time the app was built (OpenAI `created`)
    active: set["GuardedHandle"] = field(default_factory=set)   # generation requests in flight
    active_lock: threading.Lock = field(default_factory=threading.Lock)
    auth: Any = None                       # server.api_keys.ApiKeys (create_app always sets it)

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    @property
    def max_seq_len(self) -> int:
        return self.engine.max_seq_len

    @cached_property
    def max_prompt_bytes(self) -> int:
        """A text longer than this cannot fit the context whatever it says, so it is refused
        before the tokenizer spends time on it: context × the longest token's UTF-8 bytes."""
        tok = self.tokenizer
        longest = max(len((tok.id_to_token(i) or "").encode("utf-8", "replace")) for i in range(tok.vocab_size))
        return self.max_seq_len * max(longest, 1)

    def stop_all(self, err: "ApiError") -> int:
        """End every generation request in flight with `err` (any thread); returns how many."""
        with self.active_lock:
            handles = list(self.active)
        for h in handles:
            h.stop(err)
        return len(handles)

    @property
    def in_flight(self) -> int:
        with self.active_lock:
            return len(self.active)


def get_ctx(request: Request) -> ServerContext:
    return request.app.state.ctx


class ApiError(Exception):
    """An error answer; rendered as TGI's or OpenAI's error shape depending on the route."""

    def __init__(self, status: int, message: str, kind: str, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param
        self.headers = headers or {}


_OPENAI_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                 404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
                 422: "invalid_request_error", 429: "rate_limit_error", 503: "server_overloaded",
                 504: "timeout"}
_OPENAI_CODES = {"not_found": "model_not_found", "overloaded": "server_overloaded",
                 "too_large": "request_too_large", "timeout": "timeout",
                 "rate_limited": "rate_limit_exceeded", "auth": "invalid_api_key"}


def is_openai_path(path: str) -> bool:
    return path.startswith("/v1/")


def error_body(err: ApiError, openai: bool) -> BaseModel:
    """The one error shape: OpenAI's `{"error": {message, type, param, code}}` under /v1/,
    TGI's `{"error", "error_type"}` everywhere else (also as the last event of a stream)."""
    # A message may quote client text; a lone surrogate in it could not be encoded as UTF-8.
    message = err.message.encode("utf-8", "backslashreplace").decode("utf-8")
    if openai:
        param = "model" if err.kind == "not_found" else err.param
        return ErrorResponse(error={"message": message, "type": _OPENAI_TYPES.get(err.status, "server_error"),
                                    "param": param, "code": _OPENAI_CODES.get(err.kind)})
    return TGIError(error=message, error_type=err.kind)


def error_response(path: str, err: ApiError) -> JSONResponse:
    body = error_body(err, is_openai_path(path)).model_dump()
    return JSONResponse(body, status_code=err.status, headers=err.headers)


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
        # An output grammar that does not compile, or an image the adapter cannot take, is
        # unprocessable on every API.
        status = 422 if e.field in ("grammar", "image") else validation_status
        return ApiError(status, f"{field}: {e.message}", "validation", field)
    if isinstance(e, EngineOverloadedError):
        return ApiError(503, f"server overloaded, retry later: {e}", "overloaded",
                        headers={"Retry-After": str(settings.retry_after_s)})
    if isinstance(e, EngineClosedError):
        return ApiError(503, f"{SHUTTING_DOWN}: {e}", "unavailable",
                        headers={"Retry-After": str(settings.retry_after_s)})
    if isinstance(e, (EngineError, StoreCorruptError)):
        return ApiError(500, f"generation failed: {e}", "generation")
    raise e


def encode_prompt(ctx: ServerContext, text: str, add_bos: bool | None = None) -> list[int]:
    """Tokenize a prompt (called in a worker thread: see start_counted)."""
    check_text("prompt", text)
    size = len(text.encode("utf-8"))
    if size > ctx.max_prompt_bytes:
        raise InvalidRequestError("prompt", f"the prompt is {size} bytes: more than any prompt that fits "
                                  f"the context of {ctx.max_seq_len} tokens ({ctx.max_prompt_bytes} bytes)")
    ids = ctx.tokenizer.encode(text, add_bos=add_bos)
    if not ids:
        raise InvalidRequestError("prompt", "the prompt encodes to zero tokens")
    return ids


def resolve_max_new_tokens(ctx: ServerContext, requested: int | None, prompt_len: int) -> int:
    """A request without a limit gets the server default, capped by the server's limit and the
    room left in the context; an explicit one over the server's limit is refused (as TGI does)."""
    if prompt_len >= ctx.max_seq_len:
        raise InvalidRequestError("prompt", f"the prompt has {prompt_len} tokens; the context holds "
                                  f"{ctx.max_seq_len} (prompt + at least one new token)")
    limit = ctx.settings.max_new_tokens_limit
    if requested is None:
        return max(1, min(ctx.settings.default_max_new_tokens, limit or ctx.max_seq_len,
                          ctx.max_seq_len - prompt_len))
    if limit is not None and isinstance(requested, int) and requested > limit:
        raise InvalidRequestError("max_new_tokens", f"must be at most {limit} (this server's limit), got {requested}")
    return requested


async def acquire_adapter(ctx: ServerContext, requested: str | None):
    """'name' or 'name@N' → a lease on the exact version to serve (None = base model), or a 404;
    a composed 'a:0.7+b' → a lease on 'a@3:0.7+b@1' (adapters/compose.py).

    Pinning the version here means everything said about the request (metrics label,
    system_fingerprint) names the version that actually serves it, even if an upload lands
    before the engine runs it. The lease is taken in a worker thread: loading a version not yet
    on the device (reading its file, computing its K/V) never stalls the event loop."""
    try:
        check_adapter(requested)   # before the store: a key's forbidden adapter reads as missing
    except AdapterNotFoundError as e:
        raise engine_error(e, ctx.settings) from None
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
# build their calls without knowing about leases; the other requests of an n > 1 group acquire
# the same, now resident, version in the engine); whatever is left is released afterwards.
_pending_lease: ContextVar[list | None] = ContextVar("pending_lease", default=None)


def request_label(requested: str | None) -> str:
    """Metrics label before the adapter is resolved: unknown names must not become label values
    (anyone could otherwise create unbounded series)."""
    return adapter_label(None) if requested is None else UNKNOWN_LABEL


def submit(ctx: ServerContext, prompt_ids: list[int], params: SamplingParams, adapter_ref: str | None,
           validation_status: int = 422, field_names: dict[str, str] | None = None,
           images: tuple[ImageInput, ...] = ()):
    """Validate and enqueue → a GuardedHandle; raise ApiError for anything the caller did wrong
    or overload. Must run on the event loop (the handle's deadline timer lives there). The
    adapter lease start_counted holds, if any, goes to the engine."""
    pending = _pending_lease.get()
    lease = pending.pop() if pending else None
    try:
        params.validate()
        request = GenerationRequest(prompt_ids, params, adapter=adapter_ref, tenant=current_tenant(),
                                    images=images)
        with ctx.auth.charging_caller(request.request_id):
            owned, lease = lease, None      # the engine owns it now (and releases it if it refuses)
            return GuardedHandle(ctx, ctx.engine.submit(request, lease=owned))
    except (AdapterNotFoundError, AdapterNameError, AdapterValidationError, InvalidRequestError,
            EngineOverloadedError, EngineClosedError, EngineError, StoreCorruptError) as e:
        raise engine_error(e, ctx.settings, validation_status, field_names) from None
    finally:
        if lease is not None:       # refused before the engine took it
            lease.release()


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


def counted_stream(ctx: ServerContext, endpoint: str, label: str, handle, body: AsyncIterator[str],
                   openai: bool) -> EngineEventStream:
    """An SSE answer from `body`'s events, counted once in the metrics however it ends: done
    (200), the client gone (499), or an error, which becomes one last event in the route's
    error shape (a bug included: the client gets an error event, not a cut connection)."""
    outcome = {"status": 499}

    async def events() -> AsyncIterator[str]:
        try:
            async for event in body:
                yield event
            outcome["status"] = 200
        except Exception as e:      # noqa: BLE001 — every failure ends the stream with an error event
            if isinstance(e, (ApiError, EngineError)):
                err = e if isinstance(e, ApiError) else engine_error(e, ctx.settings)
            else:
                log.exception("stream failed")
                err = ApiError(500, f"internal error: {type(e).__name__}", "generation")
            outcome["status"] = err.status
            yield sse(error_body(err, openai=openai))
        finally:
            handle.cancel()   # no-op when finished; frees the engine request when the client went away

    def record() -> None:
        ctx.metrics.observe_request(endpoint, outcome["status"], label)

    return EngineEventStream(events(), on_close=record)


class GuardedHandle:
    """An engine request handle as the routes see it: the same API (async iteration, result(),
    cancel()), plus a way to end it from outside with a given error (the request deadline, the
    end of the shutdown grace period). A request ended that way raises that error from
    result(), so streams end with an error event and plain answers with a JSON error."""

    def __init__(self, ctx: ServerContext, handle):
        self._ctx, self._handle = ctx, handle
        self.request_id = handle.request_id
        self._stopped: ApiError | None = None
        self._timer: asyncio.TimerHandle | None = None
        timeout = ctx.settings.request_timeout_s
        if timeout:
            err = ApiError(504, f"the request did not finish within this server's timeout of {timeout:g} s "
                                "(--request-timeout)", "timeout")
            self._timer = asyncio.get_running_loop().call_later(timeout, self.stop, err)
        with ctx.active_lock:
            ctx.active.add(self)

    def __aiter__(self) -> AsyncIterator[TokenEvent]:
        return self._handle.__aiter__()

    def stop(self, err: ApiError) -> None:
        """End the request with `err` (thread-safe; a no-op once it finished)."""
        if self._stopped is None:
            self._stopped = err
        self._handle.cancel()

    def cancel(self) -> None:
        self._done()
        self._handle.cancel()

    async def result(self) -> GenerationResult:
        try:
            result = await self._handle.result()
        finally:
            self._done()
        if result.finish_reason == "cancelled":
            raise self._stopped or ApiError(503, f"the request was cancelled: {SHUTTING_DOWN}", "unavailable")
        return result

    def _done(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        with self._ctx.active_lock:
            self._ctx.active.discard(self)


async def start_counted(ctx: ServerContext, endpoint: str, requested: str | None, make_call: Callable[[str | None], Any]):
    """Resolve the adapter, build the route's call and submit it → (call, handle, metrics label).

    The call is built in a worker thread: tokenizing a long prompt or rendering a chat template
    must not stall the event loop. A refusal (unknown adapter, bad parameter, overload, shutting
    down) is counted in the metrics and re-raised.
    """
    label = request_label(requested)
    pending: list = []
    token = _pending_lease.set(pending)
    try:
        if ctx.draining:
            raise ApiError(503, SHUTTING_DOWN, "unavailable", headers={"Retry-After": str(ctx.settings.retry_after_s)})
        lease = await acquire_adapter(ctx, requested)
        adapter_ref = lease.ref if lease is not None else None
        if lease is not None:
            pending.append(lease)
        label = adapter_label(adapter_ref)
        call = await run_in_threadpool(make_call, adapter_ref)
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
