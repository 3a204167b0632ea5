"""OpenAI-compatible API: `/v1/chat/completions`, `/v1/completions`, `/v1/models`.

`model` picks the adapter ("name" or "name@N"); the base model's id means none; anything else
is a 404 in OpenAI's error shape, never a silent fallback to the base model.
"""

from __future__ import annotations

import time
from typing import AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from model.chat_template import ChatTemplateError
from server.api_keys import may_list
from server.routes_common import (ApiError, EngineEventStream, ServerContext, counted_answer,
                                  encode_prompt, engine_error, error_body, finite_logprob, get_ctx,
                                  resolve_max_new_tokens, sse, start_counted, submit)
from server.schemas_openai import (COMPLETIONS_DEFAULT_MAX_TOKENS, AssistantMessage, ChatChoice,
                                   ChatChunkChoice, ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, ChatDelta, ChoiceLogprobs,
                                   Completion, CompletionChoice, CompletionLogprobs, CompletionRequest,
                                   ErrorResponse, ModelCard, ModelList, TokenLogprob, TopLogprob, Usage,
                                   SamplingFields)
from server.types import EngineError, GenerationResult, InvalidRequestError, SamplingParams

router = APIRouter(prefix="/v1", tags=["OpenAI"])

_ERRORS = {400: {"model": ErrorResponse}, 404: {"model": ErrorResponse}, 413: {"model": ErrorResponse},
           503: {"model": ErrorResponse}}
_SSE = {200: {"content": {"text/event-stream": {}}}}


def _finish(result: GenerationResult) -> str:
    # never "cancelled": GuardedHandle.result() raises the reason instead
    return "length" if result.finish_reason == "length" else "stop"


def _refuse_unsupported(body: SamplingFields) -> None:
    checks = [
        ("n", body.n != 1, "only n=1 is supported"),
        ("presence_penalty", body.presence_penalty not in (None, 0.0), "not supported (use repetition_penalty)"),
        ("frequency_penalty", body.frequency_penalty not in (None, 0.0), "not supported (use repetition_penalty)"),
        ("logit_bias", bool(body.logit_bias), "not supported"),
    ]
    if isinstance(body, ChatCompletionRequest):
        checks += [
            ("response_format", body.response_format not in (None, {"type": "text"}),
             "only {'type': 'text'} is supported"),
            ("tools", bool(body.tools), "tool calling is not supported"),
            ("tool_choice", body.tool_choice not in (None, "none"), "tool calling is not supported"),
            ("top_logprobs", body.top_logprobs not in (None, 0) and not body.logprobs,
             "requires logprobs=true"),
        ]
    else:
        checks += [
            ("suffix", body.suffix is not None, "not supported"),
            ("best_of", body.best_of not in (None, 1), "only best_of=1 is supported"),
            ("echo", body.echo and body.logprobs is not None, "echo with logprobs is not supported"),
        ]
    for name, bad, why in checks:
        if bad:
            raise InvalidRequestError(name, why)


def _sampling_params(ctx: ServerContext, body: SamplingFields, max_tokens: int | None, top_logprobs: int,
                     prompt_len: int) -> SamplingParams:
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    return SamplingParams(
        max_new_tokens=resolve_max_new_tokens(ctx, max_tokens, prompt_len),
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=body.top_k or 0,
        repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
        seed=body.seed, stop=stop, ignore_eos=body.ignore_eos, top_logprobs=top_logprobs)


class _Call:
    """One OpenAI request: prompt, sampling parameters, adapter, and the answer's pieces."""

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
            "prompt": "messages" if chat else "prompt"}
        try:
            _refuse_unsupported(body)
            if chat:
                self.prompt_ids = self._chat_prompt(body)
                self.want_logprobs = body.logprobs
                top = body.top_logprobs or 0
                max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
            else:
                self.prompt_text, self.prompt_ids = self._completion_prompt(body)
                self.want_logprobs = body.logprobs is not None
                top = body.logprobs or 0
                max_tokens = COMPLETIONS_DEFAULT_MAX_TOKENS if body.max_tokens is None else body.max_tokens
            self.params = _sampling_params(ctx, body, max_tokens, top, len(self.prompt_ids))
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

    def _completion_prompt(self, body: CompletionRequest) -> tuple[str, list[int]]:
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and all(isinstance(x, int) for x in prompt):
            vocab = self.ctx.tokenizer.vocab_size
            if any(not 0 <= t < vocab for t in prompt):
                raise InvalidRequestError("prompt", f"token ids must be in [0, {vocab})")
            return self.ctx.tokenizer.decode(prompt), list(prompt)
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise InvalidRequestError("prompt", "exactly one prompt per request is supported")
            prompt = prompt[0]
        return prompt, encode_prompt(self.ctx, prompt)

    def submit(self):
        handle = submit(self.ctx, self.prompt_ids, self.params, self.adapter_ref, 400, self.field_names)
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + handle.request_id
        return handle

    def fingerprint(self) -> str:
        """Which exact weights answer: base fingerprint, plus the adapter version if any."""
        base = self.ctx.loaded.fingerprint[:16]
        return f"{base}+{self.adapter_ref}" if self.adapter_ref else base

    def usage(self, result: GenerationResult) -> Usage:
        return Usage(prompt_tokens=result.prompt_tokens, completion_tokens=result.generated_tokens,
                     total_tokens=result.prompt_tokens + result.generated_tokens)

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
        strs, offsets = [], []
        for t, _, _ in tokens:
            strs.append(self.token_str(t))
            offsets.append(offset)
            offset += len(strs[-1])
        tops = [{self.token_str(i): finite_logprob(l) for i, l in top} for _, _, top in tokens]
        return CompletionLogprobs(tokens=strs, token_logprobs=[finite_logprob(lp) for _, lp, _ in tokens],
                                  top_logprobs=tops, text_offset=offsets)

    def logprobs(self, tokens, offset: int = 0):
        if not self.want_logprobs:
            return None
        return self._chat_logprobs(tokens) if self.chat else self._completion_logprobs(tokens, offset)

    def visible_tokens(self, result: GenerationResult):
        is_special = self.ctx.tokenizer.is_special
        return [(t, lp, top) for t, lp, top in zip(result.token_ids, result.logprobs, result.top_logprobs)
                if not is_special(t)]

    # --- answers ---------------------------------------------------------------------------
    def response(self, result: GenerationResult) -> ChatCompletion | Completion:
        finish = _finish(result)
        logprobs = self.logprobs(self.visible_tokens(result))
        common = dict(id=self.id, created=self.created, model=self.body.model,
                      system_fingerprint=self.fingerprint(), usage=self.usage(result))
        if self.chat:
            choice = ChatChoice(index=0, message=AssistantMessage(content=result.text), logprobs=logprobs,
                                finish_reason=finish)
            return ChatCompletion(choices=[choice], **common)
        prefix = self.prompt_text if self.body.echo else ""
        return Completion(choices=[CompletionChoice(index=0, text=prefix + result.text, logprobs=logprobs,
                                                    finish_reason=finish)], **common)

    def chunk(self, text: str | None, tokens=(), finish: str | None = None, role: bool = False,
              offset: int = 0, usage: Usage | None = None, final_usage_chunk: bool = False):
        common = dict(id=self.id, created=self.created, model=self.body.model,
                      system_fingerprint=self.fingerprint(), usage=usage)
        logprobs = self.logprobs(list(tokens), offset) if tokens else None
        if self.chat:
            choices = [] if final_usage_chunk else [ChatChunkChoice(
                index=0, delta=ChatDelta(role="assistant" if role else None, content=text),
                logprobs=logprobs, finish_reason=finish)]
            return ChatCompletionChunk(choices=choices, **common)
        choices = [] if final_usage_chunk else [CompletionChoice(index=0, text=text or "", logprobs=logprobs,
                                                                 finish_reason=finish)]
        return Completion(choices=choices, **common)


def _dump(model) -> str:
    # Chunks omit null fields (role after the first delta, finish_reason before the last, ...).
    return sse(model.model_dump_json(exclude_none=True))


async def _complete(request: Request, ctx: ServerContext, body, endpoint: str):
    requested = None if body.model == ctx.model_id else body.model
    call, handle, label = await start_counted(ctx, endpoint, requested,
                                              lambda adapter_ref: _Call(ctx, body, adapter_ref))
    if body.stream:
        return _stream(ctx, call, handle, endpoint, label)
    answer = await counted_answer(request, ctx, endpoint, label, handle, call.response)
    return JSONResponse(answer.model_dump(mode="json", exclude_none=False))


def _stream(ctx: ServerContext, call: _Call, handle, endpoint: str, label: str) -> EngineEventStream:
    outcome = {"status": 499}

    async def events() -> AsyncIterator[str]:
        try:
            offset = len(call.prompt_text) if not call.chat and call.body.echo else 0
            if call.chat:
                yield _dump(call.chunk("", role=True))
            elif call.body.echo:
                yield _dump(call.chunk(call.prompt_text))
            async for ev in handle:
                visible = [] if ev.special else [(ev.token_id, ev.logprob, ev.top_logprobs)]
                if ev.text or (visible and call.want_logprobs):
                    yield _dump(call.chunk(ev.text, visible, offset=offset))
                    offset += sum(len(call.token_str(t)) for t, _, _ in visible)
            result = await handle.result()
            yield _dump(call.chunk("" if not call.chat else None, finish=_finish(result)))
            if call.include_usage:
                yield _dump(call.chunk(None, usage=call.usage(result), final_usage_chunk=True))
            outcome["status"] = 200
            yield "data: [DONE]\n\n"
        except (ApiError, EngineError) as e:
            err = e if isinstance(e, ApiError) else engine_error(e, ctx.settings)
            outcome["status"] = err.status
            yield sse(error_body(err, openai=True))
        finally:
            handle.cancel()   # no-op when finished; frees the slot when the client went away

    def record() -> None:
        ctx.metrics.observe_request(endpoint, outcome["status"], label)

    return EngineEventStream(events(), on_close=record)


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
