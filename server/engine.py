"""The batched inference engine: continuous batching, a different adapter per sequence, streaming.

A loop repeats `step()` (on the engine's own thread after `start()`, or on the caller's with
`run_here`, which `serve` uses): admit waiting requests into free KV-cache slots, run one
decode forward over every sequence that is generating (each row with its own adapter, or none,
in the same batched call) and one forward over prompt chunks of sequences still in prefill,
sample every row with its own parameters, and hand the new tokens to each request's stream.

Thread model: `submit`, `cancel`, `stats` may be called from any thread; everything that
touches tensors runs on the stepping thread.
Streams are asyncio-friendly: a request submitted from inside an event loop gets its events
through `loop.call_soon_threadsafe` (one call per loop per step); one submitted outside any
loop is consumed with the blocking `iter(handle)` / `handle.wait()`.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from model.batch_adapters import BatchAdapters, position_shift
from model.kv_cache import KVCache

from .detokenize import IncrementalDetokenizer, StopStringMatcher
from .grammar import GrammarCompiler
from .sampling import RowSampler, SampledRow, sample_batch
from .scheduler import Scheduler, Sequence, StepPlan
from .types import (CompletionCallback, EngineClosedError, EngineConfig, EngineError,
                    EngineStats, FinishReason, GenerationRequest, GenerationResult,
                    InvalidRequestError, TokenEvent)

log = logging.getLogger(__name__)

_END = object()     # end-of-stream marker in a handle's queue


class RequestHandle:
    """The caller's side of one request: its token stream, its result, and cancellation."""

    def __init__(self, request: GenerationRequest, engine: "Engine", loop: asyncio.AbstractEventLoop | None):
        self.request_id = request.request_id
        self._engine = engine
        self._loop = loop
        self._queue: asyncio.Queue | queue.SimpleQueue = asyncio.Queue() if loop else queue.SimpleQueue()
        self._future = loop.create_future() if loop else None
        self._done = threading.Event()
        self._result: GenerationResult | None = None
        self._error: BaseException | None = None
        self._seq: Sequence | None = None

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
        if self._seq is not None and not self._done.is_set():
            self._engine._request_cancel(self._seq)

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
class _Active:
    """Engine-side state of one request (the payload of its scheduler Sequence)."""

    request: GenerationRequest
    handle: RequestHandle
    lease: Any                                  # AdapterLease | None
    sampler: RowSampler
    detok: IncrementalDetokenizer
    stops: StopStringMatcher
    stop_ids: frozenset[int]                    # ids that finish with "stop"
    eos_ids: frozenset[int]                     # ids that finish with "eos_token"
    seed: int
    t_submit: float
    t_first: float | None = None
    text: list[str] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    prompt_logprobs: list[tuple[float | None, list[tuple[int, float]]]] | None = None


class Engine:
    def __init__(self, loaded, registry, config: EngineConfig | None = None):
        """`loaded`: a model.loading.LoadedModel (uses .model and .tokenizer); `registry`: an
        AdapterRegistry (or None to serve the base model only)."""
        self.config = config or EngineConfig()
        self.config.validate()
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.registry = registry
        weight = self.model.tok_embeddings.weight
        self.device, self.dtype = weight.device, weight.dtype
        if self.config.device is not None and torch.device(self.config.device).type != self.device.type:
            raise ValueError(f"engine device {self.config.device} != model device {self.device}: "
                             "load the model on the engine's device")
        if self.config.dtype is not None and getattr(torch, self.config.dtype, None) != self.dtype:
            raise ValueError(f"engine dtype {self.config.dtype} != model dtype {self.dtype}: "
                             "load the model with the engine's dtype")
        self.n_layers = self.model.config.n_layers
        self.vocab_size = self.model.config.vocab_size
        self.max_seq_len = min(self.config.max_seq_len, self.model.config.max_seq_len)
        self.cache = KVCache.for_model(self.model, self.config.max_batch, self.max_seq_len)
        self.scheduler = Scheduler(self.config.max_batch, self.config.max_tokens_per_step,
                                   self.config.max_queue)
        self.eos_ids = frozenset(self.tokenizer.stop_ids)
        self.grammars = GrammarCompiler(self.tokenizer, self.vocab_size)
        self._decode_model = (torch.compile(self.model, dynamic=True) if self.config.compile
                              else self.model)
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._cancel_requests: list[Sequence] = []
        self._accepting = True
        self._stop = False
        self._thread: threading.Thread | None = None
        self._callbacks: list[CompletionCallback] = []
        self._outbox: dict[asyncio.AbstractEventLoop | None, list[tuple[RequestHandle, Any]]] = {}
        self._adapter_key: tuple = ()
        self._adapter_batch: BatchAdapters | None = None
        self._counters = dict(tokens_generated_total=0, prompt_tokens_total=0,
                              requests_finished_total=0, requests_cancelled_total=0, steps_total=0)

    # ---- public API -----------------------------------------------------------------------
    def start(self) -> "Engine":
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="engine-step", daemon=True)
            self._thread.start()
        return self

    def run_here(self, keep_going: Callable[[], bool]) -> None:
        """The step loop on the calling thread, instead of start()'s own, until shutdown() or,
        once idle, until keep_going() turns false (checked twice a second while idle).

        Why a server steps on its main thread: GNU OpenMP (torch's CPU thread pool) spins
        between parallel regions only while its threads do not outnumber the cores; a second
        thread running torch work after the main thread (which loaded the model) doubles them,
        and each parallel region then pays a sleeping worker's wake-up. Measured on 2 cores:
        batch-1 decode ~25% and 32-row decode ~12% slower on a separate thread.
        """
        if self._thread is not None:
            raise RuntimeError("the engine already runs on its own thread (start())")
        self._run(keep_going)

    def shutdown(self, graceful: bool = True, timeout: float | None = None) -> None:
        """Stop taking requests; graceful: finish those admitted or waiting, else cancel them."""
        with self._lock:
            self._accepting = False
            if not graceful:
                self._cancel_requests.extend(self.scheduler.running)
                self._cancel_requests.extend(self.scheduler.waiting)
            self._stop = True
            self._wakeup.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        else:
            while self._has_work():
                self.step()

    def add_completion_callback(self, fn: CompletionCallback) -> None:
        """fn(result) is called on the engine thread for every finished request; keep it quick."""
        self._callbacks.append(fn)

    def submit(self, request: GenerationRequest) -> RequestHandle:
        self._validate(request)
        if not self._accepting:
            raise EngineClosedError("engine is shutting down")
        params = request.params
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        handle = RequestHandle(request, self, loop)
        grammar = self.grammars.matcher(params.grammar) if params.grammar is not None else None
        # Fail fast on a full queue before pinning an adapter (add() re-checks under the lock).
        self.scheduler.check_room()
        lease = self._acquire(request.adapter)
        # Prefix tuning moves the row's RoPE positions past its prefix: they must stay in the table.
        shift = position_shift(lease.parts) if lease is not None else 0
        if shift and len(request.prompt_ids) + params.max_new_tokens + shift > self.model.config.max_seq_len:
            lease.release()
            raise InvalidRequestError(
                "max_new_tokens", f"prompt + max_new_tokens + the adapter's prefix of {shift} exceed the "
                f"model's context of {self.model.config.max_seq_len}")
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        prompt = list(request.prompt_ids)
        user_stop_ids = frozenset(params.stop_token_ids)
        active = _Active(
            request=request, handle=handle, lease=lease,
            sampler=RowSampler(params, seed, prompt, self.device, grammar),
            detok=IncrementalDetokenizer(self.tokenizer, prompt),
            stops=StopStringMatcher(params.stop),
            stop_ids=user_stop_ids,
            eos_ids=frozenset() if params.ignore_eos else self.eos_ids - user_stop_ids,
            seed=seed, t_submit=time.perf_counter(),
            prompt_logprobs=[(None, [])] if params.prompt_logprobs is not None else None)
        seq = Sequence(prompt, len(prompt), payload=active)
        handle._seq = seq
        try:
            with self._lock:
                self.scheduler.add(seq)
                self._wakeup.notify()
        except BaseException:
            if lease is not None:
                lease.release()
            raise
        return handle

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        return await self.submit(request).result()

    def stats(self) -> EngineStats:
        return EngineStats(
            running=len(self.scheduler.running), waiting=len(self.scheduler.waiting),
            kv_slots_used=len(self.scheduler.running), kv_slots_total=self.config.max_batch,
            kv_cache_bytes=self.cache.nbytes(), **self._counters)

    # ---- request intake -------------------------------------------------------------------
    def _validate(self, request: GenerationRequest) -> None:
        request.params.validate()
        ids = request.prompt_ids
        if not ids:
            raise InvalidRequestError("prompt", "the prompt is empty")
        if any(not isinstance(t, int) or not 0 <= t < self.vocab_size for t in ids):
            raise InvalidRequestError("prompt", f"token ids must be in [0, {self.vocab_size})")
        if any(t >= self.vocab_size for t in request.params.logit_bias):
            raise InvalidRequestError("logit_bias", f"token ids must be in [0, {self.vocab_size})")
        total = len(ids) + request.params.max_new_tokens
        if total > self.max_seq_len:
            raise InvalidRequestError(
                "max_new_tokens", f"prompt ({len(ids)} tokens) + max_new_tokens "
                f"({request.params.max_new_tokens}) = {total} exceeds the context of {self.max_seq_len}")

    def _acquire(self, ref: str | None):
        if ref is None:
            return None
        if self.registry is None:
            from adapters.registry import AdapterNotFoundError
            raise AdapterNotFoundError(f"adapter {ref!r} not found: this server has no adapter registry")
        return self.registry.acquire(ref)   # raises AdapterNotFoundError naming the ref

    def _request_cancel(self, seq: Sequence) -> None:
        with self._lock:
            self._cancel_requests.append(seq)
            self._wakeup.notify()

    # ---- the step loop --------------------------------------------------------------------
    def _has_work(self) -> bool:
        return bool(self.scheduler.running or self.scheduler.waiting or self._cancel_requests)

    def _run(self, keep_going: Callable[[], bool] | None = None) -> None:
        while True:
            with self._lock:
                while not self._has_work() and not self._stop:
                    if keep_going is None:
                        self._wakeup.wait()
                    elif not self._wakeup.wait(0.5) and not keep_going():
                        return
                if self._stop and not self._has_work():
                    return
            try:
                self.step()
            except Exception as e:      # never let the thread die with requests in flight
                log.exception("engine step failed outside the forward")
                self._fail_running(EngineError(f"engine step failed: {type(e).__name__}: {e}"))
                self._flush_outbox()

    @torch.inference_mode()
    def step(self) -> None:
        """One scheduling round: cancellations, admissions, the forwards, sampling, streaming."""
        with self._lock:     # the waiting queue is shared with submit(); callbacks run unlocked
            cancels, self._cancel_requests = self._cancel_requests, []
            dequeued = [s for s in cancels if s.slot < 0 and s in self.scheduler.waiting]
            for seq in dequeued:
                self.scheduler.remove(seq)
            self.scheduler.admit()
        for seq in dequeued:
            self._complete(seq, "cancelled")
        for seq in cancels:
            if seq.slot >= 0:
                self._finish(seq, "cancelled")
        plan = self.scheduler.plan()
        if not plan.empty:
            try:
                self._run_plan(plan)
            except Exception as e:      # a bug or device error: fail this batch, keep serving
                log.exception("engine step failed")
                self._fail_running(EngineError(f"engine step failed: {type(e).__name__}: {e}"))
            self._counters["steps_total"] += 1
        self._flush_outbox()

    def _run_plan(self, plan: StepPlan) -> None:
        rows: list[Sequence] = []
        logits: list[torch.Tensor] = []
        if plan.decode:
            logits.append(self._forward_decode(plan.decode))
            rows.extend(plan.decode)
        if plan.prefill:
            prefill_logits, finished = self._forward_prefill(plan.prefill)
            done = [i for i in finished if plan.prefill[i][0].payload.request.params.max_new_tokens == 0]
            for i in done:      # prompt scoring only: no token to generate
                self._finish(plan.prefill[i][0], "length")
            finished = [i for i in finished if i not in done]
            if finished:
                logits.append(prefill_logits[finished])
                rows.extend(plan.prefill[i][0] for i in finished)
        if not rows:
            return
        sampled = sample_batch(torch.cat(logits) if len(logits) > 1 else logits[0],
                               [s.payload.sampler for s in rows])
        for seq, out in zip(rows, sampled):
            self._append_token(seq, out)

    def _forward_decode(self, rows: list[Sequence]) -> torch.Tensor:
        """One token per row → logits [B, V]."""
        dev = self.device
        tokens = torch.tensor([[s.token_ids[s.n_cached]] for s in rows], device=dev)
        positions = torch.tensor([[s.n_cached] for s in rows], device=dev)
        slots = torch.tensor([s.slot for s in rows], device=dev)
        logits = self._decode_model(tokens, positions, self.cache, slots, self._decode_adapters(rows))
        for s in rows:
            s.n_cached += 1
        return logits[:, 0]

    def _decode_adapters(self, rows: list[Sequence]) -> BatchAdapters | None:
        # The decode batch changes only when requests join or leave: reuse the stacked adapters.
        parts = tuple(_row_adapters(s) for s in rows)
        if len(parts) != len(self._adapter_key) or any(a is not b for a, b in zip(parts, self._adapter_key)):
            self._adapter_key = parts
            self._adapter_batch = BatchAdapters.build(list(parts), self.n_layers)
        return self._adapter_batch

    def _forward_prefill(self, chunks: list[tuple[Sequence, int]]) -> tuple[torch.Tensor, list[int]]:
        """Prompt chunks padded to the longest → logits [B, V] at each row's last real token,
        and the indices of rows whose prompt is now fully cached."""
        width = max(n for _, n in chunks)
        last_pos = self.max_seq_len - 1
        tokens, positions = [], []
        for seq, n in chunks:
            start = seq.n_cached
            pad = width - n
            tokens.append(seq.token_ids[start:start + n] + [0] * pad)
            # Padding goes to positions after the chunk: this row never reads them before its
            # own later tokens overwrite them (a row reads only positions ≤ its own).
            positions.append(list(range(start, start + n))
                             + [min(start + n + j, last_pos) for j in range(pad)])
        dev = self.device
        hidden = self.model.run_layers(self.model.tok_embeddings(torch.tensor(tokens, device=dev)),
                                       torch.tensor(positions, device=dev), self.cache,
                                       torch.tensor([s.slot for s, _ in chunks], device=dev),
                                       BatchAdapters.build([_row_adapters(s) for s, _ in chunks], self.n_layers))
        last = hidden[torch.arange(len(chunks), device=dev), torch.tensor([n - 1 for _, n in chunks], device=dev)]
        logits = self.model.output(self.model.norm(last)).float()
        for i, (seq, n) in enumerate(chunks):
            if seq.payload.prompt_logprobs is not None:
                self._score_prompt(seq, hidden[i, :n])
        finished = []
        for i, (seq, n) in enumerate(chunks):
            seq.n_cached += n
            self._counters["prompt_tokens_total"] += n
            if not seq.in_prefill:
                finished.append(i)
        return logits, finished

    def _score_prompt(self, seq: Sequence, hidden: torch.Tensor) -> None:
        """Prompt logprobs from this chunk's hidden states [n, dim] (same forward, only for the
        rows that ask): position p's logits score prompt token p + 1."""
        a: _Active = seq.payload
        start = seq.n_cached
        targets = seq.token_ids[start + 1:min(start + 1 + hidden.shape[0], seq.n_prompt)]
        if not targets:
            return
        lp = torch.log_softmax(self.model.output(self.model.norm(hidden[:len(targets)])).float(), dim=-1)
        picked = lp.gather(1, torch.tensor(targets, device=lp.device)[:, None])[:, 0].tolist()
        k = a.request.params.prompt_logprobs
        tops = [[] for _ in targets]
        if k:
            vals, ids = torch.topk(lp, k, dim=-1)
            tops = [list(zip(i, v)) for i, v in zip(ids.tolist(), vals.tolist())]
        a.prompt_logprobs.extend(zip(picked, tops))

    # ---- per-token bookkeeping ------------------------------------------------------------
    def _append_token(self, seq: Sequence, out: SampledRow | Exception) -> None:
        a: _Active = seq.payload
        if isinstance(out, Exception):      # this row's sampling failed: fail this request alone
            log.error("sampling failed for request %s: %s", a.request.request_id, out)
            self._release_slot(seq)
            if a.lease is not None:
                a.lease.release()
            self._post(a.handle, EngineError(f"sampling failed: {type(out).__name__}: {out}"))
            return
        tok = out.token_id
        seq.token_ids.append(tok)
        a.logprobs.append(out.logprob)
        a.top_logprobs.append(out.top_logprobs)
        if a.t_first is None:
            a.t_first = time.perf_counter()
        self._counters["tokens_generated_total"] += 1
        finish: FinishReason | None = None
        if tok in a.stop_ids:
            finish = "stop"
        elif tok in a.eos_ids:
            finish = "eos_token"
        elif out.done:                  # the grammar is complete
            finish = "stop"
        elif len(seq.token_ids) - seq.n_prompt >= a.request.params.max_new_tokens:
            finish = "length"
        text = a.detok.add(tok)
        if finish is not None:
            text += a.detok.flush()
        visible, matched = a.stops.push(text)
        if matched is not None:
            finish = "stop"
        elif finish is not None:
            visible += a.stops.flush()
        a.text.append(visible)
        self._post(a.handle, TokenEvent(tok, visible, out.logprob, out.top_logprobs,
                                        bool(self.tokenizer.is_special(tok))))
        if finish is not None:
            self._finish(seq, finish, matched)

    def _finish(self, seq: Sequence, reason: FinishReason, stop_sequence: str | None = None) -> None:
        """A running sequence is done: free its slot, then report."""
        self._release_slot(seq)
        self._complete(seq, reason, stop_sequence)

    def _release_slot(self, seq: Sequence) -> None:
        move = self.scheduler.remove(seq)
        if move is not None:        # keep slots compact: the last slot's K/V fill the hole
            n = move.seq.n_cached
            self.cache.k[:, move.dst, :, :n] = self.cache.k[:, move.src, :, :n]
            self.cache.v[:, move.dst, :, :n] = self.cache.v[:, move.src, :, :n]

    def _complete(self, seq: Sequence, reason: FinishReason, stop_sequence: str | None = None) -> None:
        """Release the adapter, deliver the result, run the completion callbacks."""
        a: _Active = seq.payload
        if a.lease is not None:
            a.lease.release()
        now = time.perf_counter()
        generated = seq.token_ids[seq.n_prompt:]
        result = GenerationResult(
            request_id=a.request.request_id, text="".join(a.text), token_ids=generated,
            logprobs=a.logprobs, top_logprobs=a.top_logprobs, finish_reason=reason,
            prompt_tokens=seq.n_prompt, generated_tokens=len(generated),
            adapter_ref=a.lease.ref if a.lease is not None else None, seed=a.seed,
            ttft_s=(a.t_first or now) - a.t_submit, latency_s=now - a.t_submit,
            stop_sequence=stop_sequence, tenant=a.request.tenant,
            prompt_logprobs=a.prompt_logprobs)
        self._counters["requests_finished_total"] += 1
        if reason == "cancelled":
            self._counters["requests_cancelled_total"] += 1
        self._post(a.handle, result)
        for fn in self._callbacks:
            try:
                fn(result)
            except Exception:
                log.exception("completion callback failed")

    def _fail_running(self, error: EngineError) -> None:
        for seq in list(self.scheduler.running):
            self.scheduler.remove(seq)      # no K/V moves: every running sequence goes
            a: _Active = seq.payload
            if a.lease is not None:
                a.lease.release()
            self._post(a.handle, error)
        self._adapter_key, self._adapter_batch = (), None

    # ---- delivery to consumers ------------------------------------------------------------
    def _post(self, handle: RequestHandle, item: Any) -> None:
        self._outbox.setdefault(handle._loop, []).append((handle, item))

    def _flush_outbox(self) -> None:
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


_BASE: tuple = ()


def _row_adapters(seq: Sequence):
    """The seam to the model: a row's adapters with weights (from its lease), () for the base."""
    lease = seq.payload.lease
    return lease.parts if lease is not None else _BASE


def _deliver(items: list[tuple[RequestHandle, Any]]) -> None:
    for handle, item in items:
        handle._receive(item)
