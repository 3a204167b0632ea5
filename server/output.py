"""The output processor: sampled tokens → text, stop decisions, stream events and results.

It runs on the engine's stepping thread right after sampling (a stop string must be seen
before the next step decides who decodes), and does no tensor work. Delivery to consumers is
batched: events collect in an outbox per event loop and go out with one
`loop.call_soon_threadsafe` per loop per step; consumers without a loop get them directly.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from model.batch_adapters import RowAdapters

from .detokenize import IncrementalDetokenizer, StopStringMatcher
from .sampling import RowSampler, SampledRow
from .types import (CompletionCallback, FinishReason, GenerationRequest, GenerationResult,
                    TokenEvent)

log = logging.getLogger(__name__)

_END = object()     # end-of-stream marker in a handle's queue


class RequestHandle:
    """The caller's side of one request: its token stream, its result, and cancellation."""

    def __init__(self, request: GenerationRequest, cancel: Callable[[], None],
                 loop: asyncio.AbstractEventLoop | None):
        self.request_id = request.request_id
        self._cancel = cancel
        self._loop = loop
        self._queue: asyncio.Queue | queue.SimpleQueue = asyncio.Queue() if loop else queue.SimpleQueue()
        self._future = loop.create_future() if loop else None
        self._done = threading.Event()
        self._result: GenerationResult | None = None
        self._error: BaseException | None = None

    # -- consumer side ----------------------------------------------------------------------
    def __aiter__(self):
        return self._aiter()

    async def _aiter(self):
        if self._loop is None:
            raise RuntimeError("this request was submitted outside an event loop: iterate it with `for`")
        while (item := await self._queue.get()) is not _END:
            yield item
        if self._error is not None:
            raise self._error

    def __iter__(self):
        if self._loop is not None:
            raise RuntimeError("this request was submitted inside an event loop: use `async for`")
        while (item := self._queue.get()) is not _END:
            yield item
        if self._error is not None:
            raise self._error

    async def result(self) -> GenerationResult:
        if self._future is None:
            raise RuntimeError("this request was submitted outside an event loop: use wait()")
        await asyncio.shield(self._future)
        return self._outcome()

    def wait(self, timeout: float | None = None) -> GenerationResult:
        """Block until the request finishes (any thread)."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.request_id} still running after {timeout}s")
        return self._outcome()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> None:
        """Stop generating; the request finishes with finish_reason "cancelled" within one step."""
        if not self._done.is_set():
            self._cancel()

    # -- engine side (runs in the consumer's loop, or on the engine thread without a loop) ----
    def _receive(self, item: Any) -> None:
        if isinstance(item, TokenEvent):
            self._queue.put_nowait(item)
            return
        if isinstance(item, GenerationResult):
            self._result = item
        else:
            self._error = item
        self._done.set()
        self._queue.put_nowait(_END)
        if self._future is not None and not self._future.done():
            self._future.set_result(None)

    def _outcome(self) -> GenerationResult:
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result


@dataclass(eq=False)
class RequestState:
    """Everything the engine keeps for one request besides its scheduler Sequence."""

    request: GenerationRequest
    handle: RequestHandle
    lease: Any                                  # AdapterLease | None; released when the request ends
    sampler: RowSampler
    detok: IncrementalDetokenizer
    stops: StopStringMatcher
    stop_ids: frozenset[int]                    # ids that finish with "stop"
    eos_ids: frozenset[int]                     # ids that finish with "eos_token"
    seed: int
    t_submit: float
    t_admitted: float | None = None             # first admission to the running batch
    t_first: float | None = None
    text: list[str] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    # prompt position → (logprob, alternatives); filled by the prefill chunks that predict them
    prompt_logprobs: dict[int, tuple[float, list[tuple[int, float]]]] | None = None
    # The lease's adapters with each image-conditioned one replaced by its K/V for this request's
    # image (server/visual_prompts.py); set before the first prefill of a request with images.
    image_parts: RowAdapters | None = None

    @property
    def parts(self) -> RowAdapters:
        """The row's adapters with their weights, as the model takes them (() = the base)."""
        if self.image_parts is not None:
            return self.image_parts
        return self.lease.parts if self.lease is not None else ()

    @property
    def awaiting_image_parts(self) -> bool:
        return bool(self.request.images) and self.image_parts is None

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.prompt_logprobs is not None


class OutputProcessor:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.callbacks: list[CompletionCallback] = []
        self._outbox: dict[asyncio.AbstractEventLoop | None, list[tuple[RequestHandle, Any]]] = {}

    def add_token(self, state: RequestState, token_ids: list[int], n_prompt: int,
                  out: SampledRow) -> tuple[FinishReason, str | None] | None:
        """Record one sampled token (already appended to token_ids), stream its text and say
        whether the request is done: (finish reason, matched stop string) or None."""
        tok = out.token_id
        state.logprobs.append(out.logprob)
        state.top_logprobs.append(out.top_logprobs)
        if state.t_first is None:
            state.t_first = time.perf_counter()
        finish: FinishReason | None = None
        if tok in state.stop_ids:
            finish = "stop"
        elif tok in state.eos_ids:
            finish = "eos_token"
        elif out.done:                  # the grammar is complete
            finish = "stop"
        elif len(token_ids) - n_prompt >= state.request.params.max_new_tokens:
            finish = "length"
        text = state.detok.add(tok)
        if finish is not None:
            text += state.detok.flush()
        visible, matched = state.stops.push(text)
        if matched is not None:
            finish = "stop"
        elif finish is not None:
            visible += state.stops.flush()
        state.text.append(visible)
        self.post(state.handle, TokenEvent(tok, visible, out.logprob, out.top_logprobs,
                                           bool(self.tokenizer.is_special(tok))))
        return (finish, matched) if finish is not None else None

    def complete(self, state: RequestState, token_ids: list[int], n_prompt: int,
                 reason: FinishReason, stop_sequence: str | None = None) -> GenerationResult:
        """Release the adapter, deliver the result, run the completion callbacks."""
        if state.lease is not None:
            state.lease.release()
        now = time.perf_counter()
        generated = token_ids[n_prompt:]
        prompt_logprobs = None
        if state.prompt_logprobs is not None:
            prompt_logprobs = [(None, [])] + [state.prompt_logprobs.get(p, (None, []))
                                              for p in range(1, n_prompt)]
        result = GenerationResult(
            request_id=state.request.request_id, text="".join(state.text), token_ids=generated,
            logprobs=state.logprobs, top_logprobs=state.top_logprobs, finish_reason=reason,
            prompt_tokens=n_prompt, generated_tokens=len(generated),
            adapter_ref=state.lease.ref if state.lease is not None else None, seed=state.seed,
            ttft_s=(state.t_first or now) - state.t_submit, latency_s=now - state.t_submit,
            queue_s=(state.t_admitted or now) - state.t_submit,
            stop_sequence=stop_sequence, tenant=state.request.tenant, prompt_logprobs=prompt_logprobs)
        self.post(state.handle, result)
        for fn in self.callbacks:
            try:
                fn(result)
            except Exception:
                log.exception("completion callback failed")
        return result

    def fail(self, state: RequestState, error: BaseException) -> None:
        if state.lease is not None:
            state.lease.release()
        self.post(state.handle, error)

    # ---- delivery to consumers ------------------------------------------------------------
    def post(self, handle: RequestHandle, item: Any) -> None:
        self._outbox.setdefault(handle._loop, []).append((handle, item))

    def flush(self) -> None:
        outbox, self._outbox = self._outbox, {}
        for loop, items in outbox.items():
            if loop is None:
                for handle, item in items:
                    handle._receive(item)
                continue
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:        # the consumer's loop is closed: nobody is listening
                pass


def _deliver(items: list[tuple[RequestHandle, Any]]) -> None:
    for handle, item in items:
        handle._receive(item)
