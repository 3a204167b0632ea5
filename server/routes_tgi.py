"""TGI / LoRAX native API: `POST /generate`, `POST /generate_stream`, and the compat `POST /`
that the `text-generation` and `lorax-client` packages actually call."""

from __future__ import annotations

import json
from typing import AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from adapters.compose import from_ids_and_weights
from adapters.validation import AdapterValidationError
from server.images import request_images, split_markdown_images
from server.routes_common import (ApiError, EngineEventStream, ServerContext, counted_answer, counted_stream,
                                  encode_prompt, engine_error, finite_logprob, get_ctx,
                                  request_label, resolve_max_new_tokens, sse, start_counted, submit)
from server.schemas_tgi import (AlternativeToken, Details, GenerateResponse, InputToken, StreamDetails,
                                StreamResponse, TGIError, TGIParameters, TGIRequest, Token)
from server.types import (GenerationResult, Grammar, InvalidRequestError, SamplingParams,
                          TokenEvent)

router = APIRouter(tags=["TGI / LoRAX"])

_FINISH = {"length": "length", "eos_token": "eos_token", "stop": "stop_sequence"}
_ERRORS = {404: {"model": TGIError}, 413: {"model": TGIError}, 422: {"model": TGIError},
           503: {"model": TGIError}}


def _refuse_unsupported(p: TGIParameters) -> None:
    """Parameters the clients may send that this server cannot honour: a clear 422, not a shrug."""
    if p.adapter_source not in (None, "local"):
        raise InvalidRequestError("adapter_source", f"{p.adapter_source!r} is not supported: adapters are "
                                  "served from this server's store (upload them with PUT /admin/adapters)")
    checks = [
        ("frequency_penalty", p.frequency_penalty not in (None, 0.0), "not supported"),
        ("typical_p", p.typical_p not in (None, 1.0), "typical sampling is not supported"),
        ("best_of", p.best_of not in (None, 1), "only best_of=1 is supported"),
        ("watermark", p.watermark, "watermarking is not supported"),
        ("response_format", p.response_format is not None and p.grammar is not None,
         "give either response_format or grammar"),
    ]
    for name, bad, why in checks:
        if bad:
            raise InvalidRequestError(name, why)
    for name in ("return_k_alternatives", "top_n_tokens", "truncate"):
        value = getattr(p, name)
        if value is not None and value < 1:
            raise InvalidRequestError(name, f"must be ≥ 1, got {value}")


def _sampling_params(ctx: ServerContext, p: TGIParameters, prompt_len: int) -> SamplingParams:
    # TGI samples when asked to or when any sampling knob is set; otherwise it decodes greedily.
    sampling = (p.do_sample or p.temperature not in (None, 1.0) or p.top_k not in (None, 0)
                or p.top_p not in (None, 1.0))
    return SamplingParams(
        max_new_tokens=resolve_max_new_tokens(ctx, p.max_new_tokens, prompt_len),
        temperature=(1.0 if p.temperature is None else p.temperature) if sampling else 0.0,
        top_p=1.0 if p.top_p is None else p.top_p,
        top_k=p.top_k or 0,
        repetition_penalty=1.0 if p.repetition_penalty is None else p.repetition_penalty,
        seed=p.seed,
        stop=list(p.stop),
        ignore_eos=p.ignore_eos_token,
        top_logprobs=max(p.return_k_alternatives or 0, p.top_n_tokens or 0),
        prompt_logprobs=0 if p.details and p.decoder_input_details else None,
        grammar=_grammar(p.grammar) if p.response_format is None else _response_format(p.response_format),
    )


def _response_format(response_format: dict) -> Grammar:
    """LoRAX's (and lorax-client's) {"type": "json_object", "schema": {...}}."""
    if response_format.get("type") != "json_object":
        raise InvalidRequestError("response_format", "type must be json_object")
    return Grammar("json", response_format.get("schema") or {"type": "object"})


def _grammar(grammar: dict | None) -> Grammar | None:
    """TGI's {"type": "json", "value": schema} or {"type": "regex", "value": pattern}."""
    if grammar is None:
        return None
    kind, value = grammar.get("type"), grammar.get("value")
    if kind == "json":
        if isinstance(value, str):      # TGI accepts the schema as a JSON string too
            try:
                value = json.loads(value)
            except ValueError as e:
                raise InvalidRequestError("grammar", f"value is not valid JSON: {e}") from None
        return Grammar("json", value)
    if kind == "regex":
        return Grammar("regex", value)
    raise InvalidRequestError("grammar", f"type must be json or regex, got {kind!r}")


def _requested_adapter(body: TGIRequest) -> str | None:
    top, inner = body.adapter_id, body.parameters.adapter_id
    if top is not None and inner is not None and top != inner:
        raise ApiError(422, "adapter_id given twice with different values", "validation", "adapter_id")
    single = top if top is not None else inner
    composed = _composed_adapters(body.parameters)
    if composed is not None and single is not None:
        raise ApiError(422, "give adapter_id or adapter_ids / merged_adapters, not both", "validation", "adapter_ids")
    return composed if composed is not None else single


def _composed_adapters(p: TGIParameters) -> str | None:
    """`adapter_ids` + `adapter_weights` (TGI style) or LoRAX `merged_adapters` → 'a:0.7+b:0.3'."""
    field, ids, weights = "adapter_ids", p.adapter_ids, p.adapter_weights
    if p.merged_adapters is not None:
        m, field = p.merged_adapters, "merged_adapters"
        if ids is not None:
            raise ApiError(422, "give adapter_ids or merged_adapters, not both", "validation", field)
        strategy = m.get("merge_strategy") or "linear"
        if strategy != "linear":
            raise ApiError(422, f"merged_adapters.merge_strategy {strategy!r} is not supported: "
                                "only 'linear' (weighted sum of the adapters' effects)", "validation", field)
        ids, weights = m.get("ids"), m.get("weights")
    elif weights is not None and ids is None:
        raise ApiError(422, "adapter_weights needs adapter_ids", "validation", "adapter_weights")
    if ids is None:
        return None
    if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
        raise ApiError(422, f"{field}: ids must be a non-empty list of adapter names", "validation", field)
    try:
        return from_ids_and_weights(ids, weights)
    except AdapterValidationError as e:
        raise ApiError(422, f"{field}: {e}", "validation", field) from None


class _Call:
    """One TGI request translated for the engine, and its answer translated back."""

    def __init__(self, ctx: ServerContext, body: TGIRequest, adapter_ref: str | None):
        p = body.parameters
        self.ctx, self.body, self.p, self.adapter_ref = ctx, body, p, adapter_ref
        self.field_names = {"prompt": "inputs",
                            "top_logprobs": "return_k_alternatives" if p.return_k_alternatives else "top_n_tokens",
                            "grammar": "response_format" if p.response_format is not None else "grammar"}
        try:
            _refuse_unsupported(p)
            # Markdown images (TGI's form) leave the text: they condition the adapter, not the tokens.
            text, urls = split_markdown_images(body.inputs)
            self.images = request_images(ctx, urls, "inputs")
            self.prompt_ids = encode_prompt(ctx, text)
            if p.truncate is not None:
                self.prompt_ids = self.prompt_ids[-p.truncate:]
            self.params = _sampling_params(ctx, p, len(self.prompt_ids))
        except InvalidRequestError as e:
            raise engine_error(e, ctx.settings, field_names=self.field_names) from None
        self.sampled = self.params.temperature > 0

    def submit(self):
        return submit(self.ctx, self.prompt_ids, self.params, self.adapter_ref, field_names=self.field_names,
                      images=self.images)

    def _finish_reason(self, result: GenerationResult) -> str:
        return _FINISH[result.finish_reason]   # never "cancelled": GuardedHandle.result() raises

    def _token_text(self, token_id: int) -> str:
        return self.ctx.tokenizer.decode([token_id], skip_special=False)

    def _alternatives(self, top: list[tuple[int, float]]) -> list[AlternativeToken]:
        return [AlternativeToken(id=i, text=self._token_text(i), logprob=finite_logprob(lp)) for i, lp in top]

    def _top_tokens(self, top: list[tuple[int, float]]) -> list[Token]:
        return [Token(id=i, text=self._token_text(i), logprob=finite_logprob(lp),
                      special=self.ctx.tokenizer.is_special(i)) for i, lp in top]

    def _token(self, token_id: int, text: str, logprob: float, special: bool,
               top: list[tuple[int, float]]) -> Token:
        alternatives = self._alternatives(top) if self.p.return_k_alternatives else None
        return Token(id=token_id, text=text, logprob=finite_logprob(logprob), special=special,
                     alternative_tokens=alternatives)

    def full_text(self, text: str) -> str:
        return self.body.inputs + text if self.p.return_full_text else text

    def response(self, result: GenerationResult) -> GenerateResponse:
        finish = self._finish_reason(result)
        details = None
        if self.p.details:
            tokens = [self._token(t, self._token_text(t), lp, self.ctx.tokenizer.is_special(t), top)
                      for t, lp, top in zip(result.token_ids, result.logprobs, result.top_logprobs)]
            prefill = ([InputToken(id=t, text=self._token_text(t), logprob=None if lp is None else finite_logprob(lp))
                        for t, (lp, _) in zip(self.prompt_ids, result.prompt_logprobs)]
                       if self.p.decoder_input_details else [])
            top_tokens = ([self._top_tokens(top) for top in result.top_logprobs]
                          if self.p.top_n_tokens else None)
            details = Details(finish_reason=finish, prompt_tokens=result.prompt_tokens,
                              generated_tokens=result.generated_tokens,
                              seed=result.seed if self.sampled else None, prefill=prefill, tokens=tokens,
                              top_tokens=top_tokens)
        return GenerateResponse(generated_text=self.full_text(result.text), details=details)

    def stream_event(self, ev: TokenEvent, result: GenerationResult | None = None) -> StreamResponse:
        text = ev.text if not ev.special else self._token_text(ev.token_id)
        event = StreamResponse(token=self._token(ev.token_id, text, ev.logprob, ev.special, ev.top_logprobs),
                               top_tokens=self._top_tokens(ev.top_logprobs) if self.p.top_n_tokens else None)
        if result is not None:
            event.generated_text = self.full_text(result.text)
            event.details = StreamDetails(finish_reason=self._finish_reason(result),
                                          prompt_tokens=result.prompt_tokens,
                                          generated_tokens=result.generated_tokens,
                                          seed=result.seed if self.sampled else None)
        return event


async def _start(ctx: ServerContext, body: TGIRequest, endpoint: str) -> tuple[_Call, object, str]:
    try:
        requested = _requested_adapter(body)
    except ApiError as e:
        ctx.metrics.observe_request(endpoint, e.status, request_label(body.adapter_id))
        raise
    return await start_counted(ctx, endpoint, requested, lambda adapter_ref: _Call(ctx, body, adapter_ref))


async def _generate(request: Request, ctx: ServerContext, body: TGIRequest, endpoint: str,
                    as_list: bool) -> JSONResponse:
    call, handle, label = await _start(ctx, body, endpoint)
    answer = await counted_answer(request, ctx, endpoint, label, handle, call.response)
    content = answer.model_dump(mode="json")
    return JSONResponse([content] if as_list else content)


async def _stream(ctx: ServerContext, body: TGIRequest, endpoint: str) -> EngineEventStream:
    call, handle, label = await _start(ctx, body, endpoint)

    async def events() -> AsyncIterator[str]:
        # TGI puts generated_text/details on the last token's event, so each event is held back
        # until the next one (or the end) shows whether it is the last.
        pending: TokenEvent | None = None
        async for ev in handle:
            if pending is not None:
                yield sse(call.stream_event(pending))
            pending = ev
        result = await handle.result()
        if pending is not None:
            yield sse(call.stream_event(pending, result))

    return counted_stream(ctx, endpoint, label, handle, events(), openai=False)


@router.post("/generate", response_model=GenerateResponse, responses=_ERRORS)
async def generate(request: Request, body: TGIRequest, ctx: ServerContext = Depends(get_ctx)):
    """Generate text (TGI/LoRAX schema); `adapter_id` selects the adapter, null = base model."""
    return await _generate(request, ctx, body, "generate", as_list=False)


@router.post("/generate_stream", responses={200: {"content": {"text/event-stream": {}}}, **_ERRORS})
async def generate_stream(body: TGIRequest, ctx: ServerContext = Depends(get_ctx)):
    """Stream tokens as server-sent events, one `data:` per token; the last adds generated_text and details."""
    return await _stream(ctx, body, "generate_stream")


@router.post("/", response_model=list[GenerateResponse],
             responses={200: {"content": {"text/event-stream": {}}}, **_ERRORS})
async def compat_generate(request: Request, body: TGIRequest, ctx: ServerContext = Depends(get_ctx)):
    """TGI's compat route used by its Python clients: a one-element list, or SSE when `stream` is true."""
    if body.stream:
        return await _stream(ctx, body, "compat_stream")
    return await _generate(request, ctx, body, "compat", as_list=True)
