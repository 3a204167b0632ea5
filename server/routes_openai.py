"""OpenAI-compatible API: `/v1/chat/completions`, `/v1/completions`, `/v1/models`.

`model` picks the adapter ("name" or "name@N"); the base model's id means none; anything else
is a 404 in OpenAI's error shape, never a silent fallback to the base model.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from model.chat_template import ChatTemplateError
from server.api_keys import may_list
from server.images import request_images
from server.routes_common import (EngineEventStream, ServerContext, counted_answer, counted_stream,
                                  encode_prompt, engine_error, finite_logprob, get_ctx,
                                  resolve_max_new_tokens, sse, start_counted, submit)
from server.schemas_openai import (COMPLETIONS_DEFAULT_MAX_TOKENS, AssistantMessage, ChatChoice,
                                   ChatChunkChoice, ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, ChatDelta, ChoiceLogprobs,
                                   Completion, CompletionChoice, CompletionLogprobs, CompletionRequest,
                                   ErrorResponse, ModelCard, ModelList, TokenLogprob, TopLogprob, Usage,
                                   SamplingFields)
from server.types import GenerationResult, Grammar, InvalidRequestError, SamplingParams

router = APIRouter(prefix="/v1", tags=["OpenAI"])

_ERRORS = {400: {"model": ErrorResponse}, 404: {"model": ErrorResponse}, 413: {"model": ErrorResponse},
           422: {"model": ErrorResponse}, 503: {"model": ErrorResponse}}
_SSE = {200: {"content": {"text/event-stream": {}}}}


def _finish(result: GenerationResult) -> str:
    # never "cancelled": GuardedHandle.result() raises the reason instead
    return "length" if result.finish_reason == "length" else "stop"


MAX_N = 16                      # choices per prompt (n, best_of), as OpenAI caps best_of
MAX_PROMPTS_X_CHOICES = 128     # engine requests one completions call may fan out to


def _refuse_unsupported(body: SamplingFields) -> None:
    checks = [
        ("n", not 1 <= body.n <= MAX_N, f"must be in [1, {MAX_N}]"),
        ("presence_penalty", body.presence_penalty not in (None, 0.0), "not supported (use repetition_penalty)"),
        ("frequency_penalty", body.frequency_penalty not in (None, 0.0), "not supported (use repetition_penalty)"),
    ]
    if isinstance(body, ChatCompletionRequest):
        checks += [
            ("tools", bool(body.tools), "tool calling is not supported"),
            ("tool_choice", body.tool_choice not in (None, "none"), "tool calling is not supported"),
            ("top_logprobs", body.top_logprobs not in (None, 0) and not body.logprobs,
             "requires logprobs=true"),
        ]
    else:
        checks += [
            ("suffix", body.suffix is not None, "not supported"),
            ("best_of", body.best_of is not None and not body.n <= body.best_of <= MAX_N,
             f"must be in [n, {MAX_N}]"),
            ("best_of", body.stream and (body.best_of or body.n) > body.n, "cannot be streamed"),
            ("echo", body.stream and body.echo and body.logprobs is not None,
             "echo with logprobs cannot be streamed"),
        ]
    for name, bad, why in checks:
        if bad:
            raise InvalidRequestError(name, why)


def _logit_bias(body: SamplingFields) -> dict[int, float]:
    bias = {}
    for key, value in (body.logit_bias or {}).items():
        try:
            bias[int(key)] = value
        except ValueError:
            raise InvalidRequestError("logit_bias", f"keys must be token ids, got {key!r}") from None
    return bias


def _grammar(response_format: dict | None) -> Grammar | None:
    """OpenAI's response_format → the engine's output grammar (None = free text)."""
    kind = (response_format or {}).get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return Grammar("json", {"type": "object"})
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict):
            raise InvalidRequestError("response_format", "json_schema must be an object with a 'schema'")
        return Grammar("json", spec.get("schema", {"type": "object"}))
    raise InvalidRequestError("response_format", f"type must be text, json_object or json_schema, got {kind!r}")


def choice_seed(seed: int | None, index: int) -> int | None:
    """Choice i's seed: the request's seed for choice 0, and a fixed mix of (seed, i) for the
    others, so each choice's output depends on the seed and its index, never on n."""
    if seed is None or index == 0:
        return seed
    return (seed ^ (index * 0x9E3779B97F4A7C15)) % (1 << 63)


def _sampling_params(ctx: ServerContext, body: SamplingFields, max_tokens: int | None, top_logprobs: int,
                     prompt_len: int) -> SamplingParams:
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    return SamplingParams(
        max_new_tokens=resolve_max_new_tokens(ctx, max_tokens, prompt_len),
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=body.top_k or 0,
        repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
        seed=body.seed, stop=stop, ignore_eos=body.ignore_eos, top_logprobs=top_logprobs,
        logit_bias=_logit_bias(body))


class RequestGroup:
    """The engine requests of one OpenAI call (prompts × choices), awaited, streamed and
    cancelled together; results and events come in choice-index order / tagged by index."""

    def __init__(self, handles: list):
        self.handles = handles
        self.request_id = handles[0].request_id

    async def result(self) -> list[GenerationResult]:
        try:
            return list(await asyncio.gather(*(h.result() for h in self.handles)))
        except BaseException:
            self.cancel()       # one failed: the others are no use to the caller
            raise

    def cancel(self) -> None:
        for h in self.handles:
            h.cancel()

    async def events(self) -> AsyncIterator[tuple[int, object]]:
        """(index, TokenEvent) as they come, then (index, GenerationResult) when a choice ends."""
        merged: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, handle) -> None:
            try:
                async for ev in handle:
                    merged.put_nowait((i, ev))
                merged.put_nowait((i, await handle.result()))
            except BaseException as e:      # noqa: BLE001 — re-raised by the consumer
                merged.put_nowait((i, e))

        tasks = [asyncio.ensure_future(pump(i, h)) for i, h in enumerate(self.handles)]
        try:
            for _ in range(len(tasks)):
                while True:
                    i, item = await merged.get()
                    if isinstance(item, BaseException):
                        raise item
                    yield i, item
                    if isinstance(item, GenerationResult):
                        break
        finally:
            for t in tasks:
                t.cancel()


class _Call:
    """One OpenAI request: prompts, sampling parameters, adapter, and the answer's pieces.

    Each prompt gets `best_of` (default n) engine requests, submitted together; choice
    index = prompt × n + rank."""

    def __init__(self, ctx: ServerContext, body: ChatCompletionRequest | CompletionRequest,
                 adapter_ref: str | None):
        self.ctx, self.body, self.adapter_ref = ctx, body, adapter_ref
        self.id = ""
        self.created = int(time.time())
        self.include_usage = bool(body.stream_options and body.stream_options.include_usage)
        chat = isinstance(body, ChatCompletionRequest)
        self.chat = chat
        self.field_names = {
            "max_new_tokens": ("max_completion_tokens" if chat and body.max_completion_tokens is not None
                               else "max_tokens"),
            "top_logprobs": "top_logprobs" if chat else "logprobs",
            "prompt_logprobs": "logprobs",
            "grammar": "response_format",
            "prompt": "messages" if chat else "prompt"}
        try:
            _refuse_unsupported(body)
            self.images = ()
            if chat:
                self.prompts = [("", self._chat_prompt(body))]
                # Decoded here, in the worker thread the call is built in (see start_counted).
                self.images = request_images(ctx, [url for m in body.messages for url in m.image_urls()],
                                             "messages")
                self.want_logprobs = body.logprobs
                top = body.top_logprobs or 0
                max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
                grammar = _grammar(body.response_format)
                self.samples = body.n
            else:
                self.samples = body.best_of or body.n
                self.prompts = self._completion_prompts(body)
                self.want_logprobs = body.logprobs is not None
                top = body.logprobs or 0
                max_tokens = COMPLETIONS_DEFAULT_MAX_TOKENS if body.max_tokens is None else body.max_tokens
                grammar = None
            self.echo_logprobs = not chat and body.echo and self.want_logprobs
            self.params = [dataclasses.replace(
                _sampling_params(ctx, body, max_tokens, top, len(ids)), grammar=grammar,
                prompt_logprobs=top if self.echo_logprobs else None) for _, ids in self.prompts]
        except InvalidRequestError as e:
            raise engine_error(e, ctx.settings, 400, self.field_names) from None

    def _chat_prompt(self, body: ChatCompletionRequest) -> list[int]:
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in body.messages]
        try:
            text = self.ctx.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        except ChatTemplateError as e:   # no template, or it raised ("roles must alternate" ...)
            raise InvalidRequestError("messages", str(e)) from None
        # The template writes BOS itself where the model wants one, as HF's convention has it.
        return encode_prompt(self.ctx, text, add_bos=False)

    def _completion_prompts(self, body: CompletionRequest) -> list[tuple[str, list[int]]]:
        prompt = body.prompt
        if isinstance(prompt, str) or (prompt and all(isinstance(x, int) for x in prompt)):
            prompt = [prompt]
        if not prompt or len(prompt) * self.samples > MAX_PROMPTS_X_CHOICES:
            raise InvalidRequestError("prompt", f"between 1 and {MAX_PROMPTS_X_CHOICES} prompts × choices per request")
        out = []
        vocab = self.ctx.tokenizer.vocab_size
        for p in prompt:
            if isinstance(p, str):
                out.append((p, encode_prompt(self.ctx, p)))
            elif not p or any(not 0 <= t < vocab for t in p):
                raise InvalidRequestError("prompt", f"token ids must be in [0, {vocab})")
            else:
                out.append((self.ctx.tokenizer.decode(p), list(p)))
        return out

    def submit(self) -> RequestGroup:
        handles = []
        try:
            for (_, ids), params in zip(self.prompts, self.params):
                for i in range(self.samples):
                    handles.append(submit(self.ctx, ids, dataclasses.replace(params, seed=choice_seed(params.seed, i)),
                                          self.adapter_ref, 400, self.field_names, self.images))
        except BaseException:
            for h in handles:
                h.cancel()
            raise
        group = RequestGroup(handles)
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + group.request_id
        return group

    def fingerprint(self) -> str:
        """Which exact weights answer: base fingerprint, plus the adapter version if any."""
        base = self.ctx.loaded.fingerprint[:16]
        return f"{base}+{self.adapter_ref}" if self.adapter_ref else base

    def usage(self, results: list[GenerationResult]) -> Usage:
        """Each prompt counted once; every generated token counted (best_of's discarded ones too)."""
        prompt = sum(r.prompt_tokens for r in results[::self.samples])
        completion = sum(r.generated_tokens for r in results)
        return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)

    # --- logprobs --------------------------------------------------------------------------
    def token_str(self, token_id: int) -> str:
        return self.ctx.tokenizer.decode([token_id], skip_special=False)

    def _chat_logprobs(self, tokens) -> ChoiceLogprobs:
        """tokens: (id, logprob, top) of visible (non-special) generated tokens."""
        def entry(cls, token_id, lp, **extra):
            s = self.token_str(token_id)
            return cls(token=s, logprob=finite_logprob(lp), bytes=list(s.encode("utf-8")), **extra)
        return ChoiceLogprobs(content=[
            entry(TokenLogprob, t, lp, top_logprobs=[entry(TopLogprob, i, l) for i, l in top])
            for t, lp, top in tokens])

    def _completion_logprobs(self, tokens, offset: int) -> CompletionLogprobs:
        """tokens: (id, logprob or None, top or None); each top dict also holds the token itself."""
        strs, offsets, logprobs, tops = [], [], [], []
        for t, lp, top in tokens:
            strs.append(self.token_str(t))
            offsets.append(offset)
            offset += len(strs[-1])
            logprobs.append(None if lp is None else finite_logprob(lp))
            tops.append(None if lp is None else
                        {**{self.token_str(i): finite_logprob(l) for i, l in top}, strs[-1]: logprobs[-1]})
        return CompletionLogprobs(tokens=strs, token_logprobs=logprobs, top_logprobs=tops, text_offset=offsets)

    def logprobs(self, tokens, offset: int = 0):
        if not self.want_logprobs:
            return None
        return self._chat_logprobs(tokens) if self.chat else self._completion_logprobs(tokens, offset)

    def visible_tokens(self, result: GenerationResult):
        is_special = self.ctx.tokenizer.is_special
        return [(t, lp, top) for t, lp, top in zip(result.token_ids, result.logprobs, result.top_logprobs)
                if not is_special(t)]

    def prompt_tokens(self, prompt_ids: list[int], result: GenerationResult):
        """The echoed prompt's (id, logprob, top), the first token's logprob None."""
        return [(t, lp, top) for t, (lp, top) in zip(prompt_ids, result.prompt_logprobs)]

    # --- answers ---------------------------------------------------------------------------
    def chosen(self, results: list[GenerationResult]) -> list[tuple[int, GenerationResult]]:
        """(prompt index, result) of the returned choices, in index order: per prompt, all its
        samples, or with best_of the n with the highest cumulative logprob."""
        out = []
        for p in range(len(self.prompts)):
            group = results[p * self.samples:(p + 1) * self.samples]
            if self.samples > self.body.n:
                group = sorted(group, key=lambda r: sum(r.logprobs), reverse=True)[:self.body.n]
            out += [(p, r) for r in group]
        return out

    def response(self, results: list[GenerationResult]) -> ChatCompletion | Completion:
        common = dict(id=self.id, created=self.created, model=self.body.model,
                      system_fingerprint=self.fingerprint(), usage=self.usage(results))
        choices = []
        for index, (p, result) in enumerate(self.chosen(results)):
            finish = _finish(result)
            if self.chat:
                choices.append(ChatChoice(index=index, message=AssistantMessage(content=result.text),
                                          logprobs=self.logprobs(self.visible_tokens(result)), finish_reason=finish))
                continue
            prompt_text, prompt_ids = self.prompts[p]
            tokens = self.visible_tokens(result)
            if self.echo_logprobs:
                # Scorers (lm-eval) index these entries by token position: every generated token
                # is listed, special ones too, after the prompt's.
                tokens = self.prompt_tokens(prompt_ids, result) + list(
                    zip(result.token_ids, result.logprobs, result.top_logprobs))
            prefix = prompt_text if self.body.echo else ""
            choices.append(CompletionChoice(index=index, text=prefix + result.text, logprobs=self.logprobs(tokens),
                                            finish_reason=finish))
        return (ChatCompletion if self.chat else Completion)(choices=choices, **common)

    def chunk(self, index: int, text: str | None, tokens=(), finish: str | None = None, role: bool = False,
              offset: int = 0, usage: Usage | None = None, final_usage_chunk: bool = False):
        common = dict(id=self.id, created=self.created, model=self.body.model,
                      system_fingerprint=self.fingerprint(), usage=usage)
        logprobs = self.logprobs(list(tokens), offset) if tokens else None
        if self.chat:
            choices = [] if final_usage_chunk else [ChatChunkChoice(
                index=index, delta=ChatDelta(role="assistant" if role else None, content=text),
                logprobs=logprobs, finish_reason=finish)]
            return ChatCompletionChunk(choices=choices, **common)
        choices = [] if final_usage_chunk else [CompletionChoice(index=index, text=text or "", logprobs=logprobs,
                                                                 finish_reason=finish)]
        return Completion(choices=choices, **common)


def _dump(model) -> str:
    # Chunks omit null fields (role after the first delta, finish_reason before the last, ...).
    return sse(model.model_dump_json(exclude_none=True))


async def _complete(request: Request, ctx: ServerContext, body, endpoint: str):
    requested = None if body.model == ctx.model_id else body.model
    call, group, label = await start_counted(ctx, endpoint, requested,
                                             lambda adapter_ref: _Call(ctx, body, adapter_ref))
    if body.stream:
        return _stream(ctx, call, group, endpoint, label)
    answer = await counted_answer(request, ctx, endpoint, label, group, call.response)
    return JSONResponse(answer.model_dump(mode="json", exclude_none=False))


def _stream(ctx: ServerContext, call: _Call, group: RequestGroup, endpoint: str, label: str) -> EngineEventStream:
    """Streamed choices (best_of = n here) interleave; each chunk carries its choice's index."""

    async def events() -> AsyncIterator[str]:
        n = len(group.handles)
        offsets = [len(call.prompts[i // call.samples][0]) if not call.chat and call.body.echo else 0
                   for i in range(n)]
        for i in range(n):
            if call.chat:
                yield _dump(call.chunk(i, "", role=True))
            elif call.body.echo:
                yield _dump(call.chunk(i, call.prompts[i // call.samples][0]))
        results: list[GenerationResult | None] = [None] * n
        async for i, item in group.events():
            if isinstance(item, GenerationResult):
                results[i] = item
                yield _dump(call.chunk(i, "" if not call.chat else None, finish=_finish(item)))
                continue
            visible = [] if item.special else [(item.token_id, item.logprob, item.top_logprobs)]
            if item.text or (visible and call.want_logprobs):
                yield _dump(call.chunk(i, item.text, visible, offset=offsets[i]))
                offsets[i] += sum(len(call.token_str(t)) for t, _, _ in visible)
        if call.include_usage:
            yield _dump(call.chunk(0, None, usage=call.usage(results), final_usage_chunk=True))
        yield "data: [DONE]\n\n"

    return counted_stream(ctx, endpoint, label, group, events(), openai=True)


@router.post("/chat/completions", response_model=ChatCompletion, responses={**_SSE, **_ERRORS})
async def chat_completions(request: Request, body: ChatCompletionRequest, ctx: ServerContext = Depends(get_ctx)):
    """Chat completion: messages go through the model's chat template."""
    return await _complete(request, ctx, body, "chat_completions")


@router.post("/completions", response_model=Completion, responses={**_SSE, **_ERRORS})
async def completions(request: Request, body: CompletionRequest, ctx: ServerContext = Depends(get_ctx)):
    """Legacy text completion of one prompt (text or token ids)."""
    return await _complete(request, ctx, body, "completions")


@router.get("/models", response_model=ModelList)
async def list_models(ctx: ServerContext = Depends(get_ctx)) -> ModelList:
    """The base model (no adapter) and every stored adapter, by the ids `model` accepts (with API
    keys: those the key may use)."""
    cards = []
    if may_list(None):
        cards.append(ModelCard(id=ctx.model_id, created=ctx.created, owned_by="adapter-server", root=ctx.model_id))
    if ctx.registry is not None:
        for info in filter(lambda a: may_list(a.name), ctx.registry.list()):
            cards.append(ModelCard(id=info.name, created=int(info.versions[0].created), owned_by="adapter-server",
                                   root=info.latest.ref, parent=ctx.model_id))
    return ModelList(data=cards)
