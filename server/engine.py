"""The batched inference engine: continuous batching over a paged KV cache, a different adapter
per sequence, prefix caching, streaming.

The engine glues three parts, each in its own module:

- `Scheduler` (server/scheduler.py, pure Python): owns the KV-cache blocks, admits waiting
  requests, preempts when blocks run out, plans each step's decode rows and prompt chunks;
- `ModelRunner` (server/model_runner.py): the only code that builds tensors; runs the step's
  decode and prefill forwards over the paged cache;
- `OutputProcessor` (server/output.py): detokenizing, stop decisions, stream events, results.

A loop repeats `step()` (on the engine's own thread after `start()`, or on the caller's with
`run_here`, which `serve` uses): apply cancellations, schedule, run the forwards, sample every
row with its own parameters (sampling.sample_batch), and hand the new tokens to the streams.

Thread model: `submit`, `cancel`, `stats` may be called from any thread; everything that
touches tensors runs on the stepping thread. Streams are asyncio-friendly: a request
submitted from inside an event loop gets its events through `loop.call_soon_threadsafe`
(one call per loop per step); one submitted outside any loop is consumed with the blocking
`iter(handle)` / `handle.wait()`.

A fault in one row fails that request alone: an adapter whose K/V do not fit the model
(checked once per adapter version), a sampling error, an error in stop processing.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
import weakref
from typing import Callable

import torch

from model.adapter import AdapterKV
from model.batch_adapters import position_shift
from model.kv_cache import PagedKVCache

from .detokenize import IncrementalDetokenizer, StopStringMatcher
from .grammar import GrammarCompiler
from .model_runner import ModelRunner
from .output import OutputProcessor, RequestHandle, RequestState
from .sampling import RowSampler, SampledRow, sample_batch
from .visual_prompts import VisualPrompts
from .scheduler import Scheduler, Sequence, StepPlan, prefix_root
from .types import (CompletionCallback, EngineClosedError, EngineConfig, EngineError,
                    EngineStats, FinishReason, GenerationRequest, GenerationResult,
                    InvalidRequestError)

log = logging.getLogger(__name__)

__all__ = ["Engine", "RequestHandle", "kv_cache_blocks"]

_BASE_ROOT = prefix_root("base")


def kv_cache_blocks(config: EngineConfig, model_config, dtype: torch.dtype, device: torch.device,
                    max_seq_len: int) -> int:
    """How many blocks the configured KV-cache memory holds (see EngineConfig.kv_cache_memory)."""
    per_block = PagedKVCache.bytes_per_block(model_config, dtype, config.block_size)
    budget = config.kv_cache_memory
    if budget is None:
        if device.type != "cuda":
            # Sized by the model's context, not only --max-seq-len: lowering the per-sequence
            # limit must buy more concurrent sequences, not shrink the cache under them.
            seq = max(max_seq_len, min(model_config.max_seq_len, config.DEFAULT_MAX_SEQ_LEN))
            return config.DEFAULT_CPU_SEQUENCES * -(-seq // config.block_size)
        budget = config.DEFAULT_CUDA_FRACTION
    if isinstance(budget, float):
        if device.type != "cuda":
            raise ValueError("kv_cache_memory as a fraction of free memory needs CUDA; give bytes (e.g. 2GiB)")
        free, _ = torch.cuda.mem_get_info(device)
        budget = int(free * budget)
    blocks = budget // per_block
    if blocks < 1:
        raise ValueError(f"kv_cache_memory of {budget} bytes holds no KV-cache block "
                         f"({config.block_size} tokens = {per_block} bytes on this model)")
    return blocks


class Engine:
    def __init__(self, loaded, registry, config: EngineConfig | None = None, vision=None):
        """`loaded`: a model.loading.LoadedModel (uses .model and .tokenizer); `registry`: an
        AdapterRegistry (or None to serve the base model only); `vision`: a model.vision.VisionTower
        for image-conditioned adapters (None: requests with images are refused)."""
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
        cfg = self.config
        n_blocks = kv_cache_blocks(cfg, self.model.config, self.dtype, self.device, self.max_seq_len)
        self.runner = ModelRunner(self.model, n_blocks, cfg.block_size, cfg.max_batch, self.max_seq_len,
                                  cfg.compile, cfg.cuda_graphs)
        self.scheduler = Scheduler(cfg.max_batch, cfg.max_tokens_per_step, cfg.max_queue, n_blocks,
                                   cfg.block_size, cfg.prefix_caching)
        self.output = OutputProcessor(self.tokenizer)
        self.eos_ids = frozenset(self.tokenizer.stop_ids)
        self.grammars = GrammarCompiler(self.tokenizer, self.vocab_size)
        self.vision = vision
        self.visual = VisualPrompts(self.model, vision, cfg.image_feature_cache)
        # AdapterKVs already checked to fit the model, by id (entries vanish with the object).
        self._checked_adapters: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._cancel_requests: list[Sequence] = []
        self._accepting = True
        self._stop = False
        self._thread: threading.Thread | None = None
        self._counters = dict(tokens_generated_total=0, prompt_tokens_total=0,
                              requests_finished_total=0, requests_cancelled_total=0, steps_total=0)
        self._prefix_queries: dict[str | None, int] = {}
        self._prefix_hits: dict[str | None, int] = {}

    @property
    def cache(self) -> PagedKVCache:
        return self.runner.cache

    # ---- public API -----------------------------------------------------------------------
    def start(self) -> "Engine":
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="engine-step", daemon=True)
            self._thread.start()
        return self

    def run_here(self, keep_going: Callable[[], bool]) -> None:
        """The step loop on the calling thread, instead of start()'s own, until shutdown() or,
        once idle, until keep_going() turns false (checked on becoming idle, then twice a second).

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
        self.output.callbacks.append(fn)

    def submit(self, request: GenerationRequest, lease=None) -> RequestHandle:
        """Queue a request. `lease`: the AdapterLease of request.adapter when the caller already
        acquired it (off its event loop); the engine then owns it and releases it when the
        request ends or is refused here. Without one the engine acquires it."""
        try:
            self._validate(request)
            if not self._accepting:
                raise EngineClosedError("engine is shutting down")
            # Fail fast on a full queue before pinning an adapter (add() re-checks under the lock).
            self.scheduler.check_room()
            if lease is None:
                lease = self._acquire(request.adapter)
            self._check_prefix_fits(request, lease)
            self.visual.check(lease.parts if lease is not None else (), request.images, request.adapter)
            return self._enqueue(request, lease)
        except BaseException:
            if lease is not None:
                lease.release()
            raise

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        return await self.submit(request).result()

    def stats(self) -> EngineStats:
        blocks = self.scheduler.blocks
        return EngineStats(
            running=len(self.scheduler.running), waiting=len(self.scheduler.waiting),
            kv_blocks_used=self.scheduler.blocks_used, kv_blocks_total=blocks.n_blocks,
            kv_blocks_cached=blocks.n_cached_idle, kv_block_size=self.config.block_size,
            kv_cache_bytes=self.cache.nbytes(), preemptions_total=self.scheduler.preemptions_total,
            prefix_cache_queries=dict(self._prefix_queries), prefix_cache_hits=dict(self._prefix_hits),
            images_encoded_total=self.visual.images_encoded, image_encode_seconds=self.visual.encode_seconds,
            image_feature_cache_hits=self.visual.cache.hits, image_feature_cache_misses=self.visual.cache.misses,
            **self._counters)

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
        capacity = self.scheduler.capacity_tokens
        if len(ids) > capacity:
            raise InvalidRequestError("prompt", f"the prompt ({len(ids)} tokens) is longer than the "
                                      f"whole KV cache ({capacity} tokens)")
        total = len(ids) + request.params.max_new_tokens
        limit = min(self.max_seq_len, capacity)
        if total > limit:
            what = "the context" if limit == self.max_seq_len else "the KV cache"
            raise InvalidRequestError(
                "max_new_tokens", f"prompt ({len(ids)} tokens) + max_new_tokens "
                f"({request.params.max_new_tokens}) = {total} exceeds {what} of {limit}")

    def _check_prefix_fits(self, request: GenerationRequest, lease) -> None:
        # Prefix tuning moves the row's RoPE positions past its prefix: they must stay in the table.
        shift = position_shift(lease.parts) if lease is not None else 0
        total = len(request.prompt_ids) + request.params.max_new_tokens + shift
        if shift and total > self.model.config.max_seq_len:
            raise InvalidRequestError(
                "max_new_tokens", f"prompt + max_new_tokens + the adapter's prefix of {shift} exceed the "
                f"model's context of {self.model.config.max_seq_len}")

    def _acquire(self, ref: str | None):
        if ref is None:
            return None
        if self.registry is None:
            from adapters.registry import AdapterNotFoundError
            raise AdapterNotFoundError(f"adapter {ref!r} not found: this server has no adapter registry")
        return self.registry.acquire(ref)   # raises AdapterNotFoundError naming the ref

    def _enqueue(self, request: GenerationRequest, lease) -> RequestHandle:
        params = request.params
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        prompt = list(request.prompt_ids)
        seq = Sequence(prompt, len(prompt))
        # Weak references: the handle must not keep its finished sequence (and so itself,
        # through seq.payload.handle) nor the engine alive in a cycle only the garbage collector
        # can break (the cache's decode rows keep their last sequences, and the engine the cache).
        seq_ref, engine_ref = weakref.ref(seq), weakref.ref(self)

        def cancel() -> None:
            s, engine = seq_ref(), engine_ref()
            if s is not None and engine is not None:
                engine._request_cancel(s)
        handle = RequestHandle(request, cancel, loop)
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        grammar = self.grammars.matcher(params.grammar) if params.grammar is not None else None
        user_stop_ids = frozenset(params.stop_token_ids)
        seq.payload = RequestState(
            request=request, handle=handle, lease=lease,
            sampler=RowSampler(params, seed, prompt, self.device, grammar),
            detok=IncrementalDetokenizer(self.tokenizer, prompt),
            stops=StopStringMatcher(params.stop),
            stop_ids=user_stop_ids,
            eos_ids=frozenset() if params.ignore_eos else self.eos_ids - user_stop_ids,
            seed=seed, t_submit=time.perf_counter(),
            prompt_logprobs={} if params.prompt_logprobs is not None else None)
        # What shapes this prompt's K/V: the base model or this exact adapter version (its
        # content hash too, so a version number reused after a delete cannot alias), and the
        # image of an image-conditioned adapter (its prompts differ per image).
        seq.prefix_root = _BASE_ROOT if lease is None else prefix_root(
            _adapter_identity(lease) + "".join(":image:" + im.sha256 for im in request.images))
        # Prompt logprobs need every prompt position's logits: such a request computes its
        # whole prompt (it still offers its blocks to others).
        seq.takes_prefix_hits = params.prompt_logprobs is None
        with self._lock:
            self.scheduler.add(seq)
            self._wakeup.notify()
        return handle

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
                    elif not keep_going():      # asked before waiting: an idle caller returns at once
                        return
                    else:
                        self._wakeup.wait(0.5)
                if self._stop and not self._has_work():
                    return
            try:
                self.step()
            except Exception as e:      # never let the thread die with requests in flight
                log.exception("engine step failed outside the forward")
                self._fail_running(EngineError(f"engine step failed: {type(e).__name__}: {e}"))
                self.output.flush()

    @torch.inference_mode()
    def step(self) -> None:
        """One scheduling round: cancellations, scheduling, the forwards, sampling, streaming."""
        with self._lock:     # the waiting queue is shared with submit(); callbacks run unlocked
            cancels, self._cancel_requests = self._cancel_requests, []
            cancelled = []
            for seq in cancels:
                if seq.running or seq in self.scheduler.waiting:
                    self.scheduler.remove(seq)
                    cancelled.append(seq)
            plan = self.scheduler.schedule()
        for seq in cancelled:
            self._complete(seq, "cancelled")
        self._count_admissions(plan)
        if not plan.empty:
            try:
                self._run_plan(plan)
            except Exception as e:      # a bug or device error: fail this batch, keep serving
                log.exception("engine step failed")
                self._fail_running(EngineError(f"engine step failed: {type(e).__name__}: {e}"))
            self._counters["steps_total"] += 1
        self.output.flush()

    def _count_admissions(self, plan: StepPlan) -> None:
        now = time.perf_counter()
        for seq in plan.admitted:
            if seq.payload.t_admitted is None:      # a preempted sequence keeps its first admission
                seq.payload.t_admitted = now
            if not seq.takes_prefix_hits or not self.scheduler.blocks.prefix_caching:
                continue
            name = _adapter_names(seq.payload.lease)
            self._prefix_queries[name] = self._prefix_queries.get(name, 0) + seq.prefill_len
            self._prefix_hits[name] = self._prefix_hits.get(name, 0) + seq.prefix_hit_tokens

    def _run_plan(self, plan: StepPlan) -> None:
        failed = self._attach_image_parts([s for s, _ in plan.prefill])
        decode = self._usable(plan.decode)
        usable = set(self._usable([s for s, _ in plan.prefill if s not in failed]))
        prefill = [(s, n) for s, n in plan.prefill if s in usable]
        rows: list[Sequence] = []
        logits: list[torch.Tensor] = []
        if decode:
            decode, decode_logits = self.runner.decode(decode, [s.payload.parts for s in decode])
            logits.append(decode_logits)
            for seq in decode:
                self.scheduler.cached(seq, 1)
            rows.extend(decode)
        if prefill:
            prefill_logits, done = self._prefill(prefill)
            if done:
                logits.append(prefill_logits[done])
                rows.extend(prefill[i][0] for i in done)
        if not rows:
            return
        sampled = self._sample(torch.cat(logits) if len(logits) > 1 else logits[0], rows)
        for seq, out in zip(rows, sampled):
            if isinstance(out, Exception):
                self._fail(seq, EngineError(f"sampling failed for this request: {type(out).__name__}: {out}"))
                continue
            self._add_token(seq, out)

    def _prefill(self, chunks: list[tuple[Sequence, int]]) -> tuple[torch.Tensor, list[int]]:
        """Run the chunks; returns their logits and the indices of rows whose prefill is done
        and that now sample a token (a max_new_tokens=0 request finishes here instead)."""
        want = {i: s.payload.request.params.prompt_logprobs for i, (s, _) in enumerate(chunks)
                if s.payload.wants_prompt_logprobs and s.n_cached < s.n_prompt - 1}
        logits, prompt_lps = self.runner.prefill(chunks, [s.payload.parts for s, _ in chunks], want)
        for i, lps in prompt_lps.items():
            table = chunks[i][0].payload.prompt_logprobs
            for pos, lp, top in zip(lps.positions, lps.logprobs, lps.top):
                table[pos] = (lp, top)
        done = []
        for i, (seq, n) in enumerate(chunks):
            self.scheduler.cached(seq, n)
            self._counters["prompt_tokens_total"] += n
            if seq.in_prefill:
                continue
            if seq.payload.request.params.max_new_tokens == 0:
                self._finish(seq, "length")
            else:
                done.append(i)
        return logits, done

    def _attach_image_parts(self, rows: list[Sequence]) -> set[Sequence]:
        """Give every row starting its prefill with an image its per-request adapter K/V (the
        images of all of them encoded together); returns the rows that failed (alone)."""
        waiting = [s for s in rows if s.payload.awaiting_image_parts]
        if not waiting:
            return set()
        failed = set()
        built = self.visual.row_parts([(s.payload.lease.parts, s.payload.request.images) for s in waiting])
        for seq, parts in zip(waiting, built):
            if isinstance(parts, Exception):
                self._fail(seq, EngineError(f"the request's image could not be encoded: "
                                            f"{type(parts).__name__}: {parts}"))
                failed.add(seq)
            else:
                seq.payload.image_parts = parts
        return failed

    def _usable(self, rows: list[Sequence]) -> list[Sequence]:
        """Rows whose LLaMA-Adapter K/V fit the model; the others fail alone (checked once per
        version). LoRA and prefix-tuning weights are checked against the model when loaded."""
        ok = []
        for seq in rows:
            problem = None
            for kv, _ in seq.payload.parts:
                if not isinstance(kv, AdapterKV) or self._checked_adapters.get(id(kv)) is kv:
                    continue
                problem = self._adapter_problem(kv)
                if problem is not None:
                    break
                self._checked_adapters[id(kv)] = kv
            if problem is None:
                ok.append(seq)
            else:
                self._fail(seq, EngineError(f"adapter {seq.payload.lease.ref} cannot run on this model: {problem}"))
        return ok

    def _adapter_problem(self, kv: AdapterKV) -> str | None:
        cfg = self.model.config
        if not all(0 <= i < cfg.n_layers for i in kv.layers):
            return f"adapted layers {kv.layers} outside the model's {cfg.n_layers}"
        n = len(kv.layers)      # K/V are stored for the adapted layers only
        want = (n, cfg.n_kv_heads, kv.adapter_len, cfg.head_dim)
        for name, t, shape in (("keys", kv.keys, want), ("values", kv.values, want),
                               ("gates", kv.gates, (n, cfg.n_heads))):
            if tuple(t.shape) != shape:
                return f"{name} shape {tuple(t.shape)} != {shape}"
            if t.dtype != self.dtype or t.device.type != self.device.type:
                return f"{name} are {t.dtype} on {t.device}, the model {self.dtype} on {self.device}"
            if not bool(torch.isfinite(t).all()):
                return f"{name} hold non-finite values"
        return None

    def _sample(self, logits: torch.Tensor, rows: list[Sequence]) -> list[SampledRow | Exception]:
        samplers = [s.payload.sampler for s in rows]
        try:
            return sample_batch(logits, samplers)
        except Exception:
            # A sampler that raises instead of returning its row's error: find it row by row
            # so the others still get their tokens.
            log.exception("batched sampling failed; sampling row by row")
        out: list[SampledRow | Exception] = []
        for i, sampler in enumerate(samplers):
            try:
                out.append(sample_batch(logits[i:i + 1], [sampler])[0])
            except Exception as e:
                out.append(e)
        return out

    # ---- per-token bookkeeping ------------------------------------------------------------
    def _add_token(self, seq: Sequence, out: SampledRow) -> None:
        seq.token_ids.append(out.token_id)
        self._counters["tokens_generated_total"] += 1
        try:
            finish = self.output.add_token(seq.payload, seq.token_ids, seq.n_prompt, out)
        except Exception as e:
            log.exception("output processing failed for request %s", seq.payload.request.request_id)
            self._fail(seq, EngineError(f"output processing failed: {type(e).__name__}: {e}"))
            return
        if finish is not None:
            self._finish(seq, *finish)

    def _finish(self, seq: Sequence, reason: FinishReason, stop_sequence: str | None = None) -> None:
        """A running sequence is done: free its blocks, then report."""
        self.scheduler.remove(seq)
        self._complete(seq, reason, stop_sequence)

    def _complete(self, seq: Sequence, reason: FinishReason, stop_sequence: str | None = None) -> None:
        self._counters["requests_finished_total"] += 1
        if reason == "cancelled":
            self._counters["requests_cancelled_total"] += 1
        self.output.complete(seq.payload, seq.token_ids, seq.n_prompt, reason, stop_sequence)

    def _fail(self, seq: Sequence, error: EngineError) -> None:
        """One request failed; the others go on."""
        if seq.running:
            self.scheduler.remove(seq)
        self.output.fail(seq.payload, error)

    def _fail_running(self, error: EngineError) -> None:
        for seq in list(self.scheduler.running):
            self._fail(seq, error)


def _adapter_identity(lease) -> str:
    """What shapes a prompt's K/V under this lease, for the prefix cache: every adapter's exact
    version and content hash (a version number reused after a delete cannot alias) and the
    composition weights, all of which change the keys/values (prefix tuning their positions)."""
    leases = getattr(lease, "leases", [lease])
    return "adapter:" + lease.ref + ":" + ",".join(part.info.sha256 for part in leases)


def _adapter_names(lease) -> str | None:
    """The metrics label of a request's adapter(s): names only (versions and weights would
    multiply the series)."""
    if lease is None:
        return None
    return "+".join(part.name for part in getattr(lease, "leases", [lease]))
