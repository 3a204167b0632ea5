"""Wire schemas of the TGI / LoRAX native API (`/generate`, `/generate_stream`, compat `POST /`).

Field names and shapes follow what the `text-generation` and `lorax-client` packages send and
validate. Every parameter either of them sends is declared here, so each one is either honoured
or refused with a 422 naming it; parameters neither sends are ignored, as TGI does. Types are
strict: `"4"` is not a number (an integer field also refuses 4.0; a float field takes 4).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

TGIFinishReason = Literal["length", "eos_token", "stop_sequence"]


class TGIParameters(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    adapter_id: str | None = Field(None, description="Adapter name or name@version; null = base model.")
    adapter_source: str | None = Field(
        None, description="Only 'local' (this server's adapter store) or null is supported.")
    api_token: str | None = Field(None, description="Accepted and ignored (no remote adapter sources).")
    adapter_ids: list[str] | None = Field(
        None, description="Compose several adapters (name or name@version) for this request.")
    adapter_weights: list[float] | None = Field(
        None, description="One weight per adapter_ids entry (default 1 each).")
    merged_adapters: dict[str, Any] | None = Field(
        None, description="LoRAX form of adapter_ids/adapter_weights: {ids, weights, merge_strategy: "
                          "'linear'}; other strategies are refused.")
    do_sample: bool = Field(False, description="Sample instead of greedy decoding.")
    max_new_tokens: int | None = Field(None, description="Tokens to generate; default fills up to the server's default.")
    ignore_eos_token: bool = False
    repetition_penalty: float | None = None
    frequency_penalty: float | None = Field(None, description="Not supported; must be null.")
    return_full_text: bool = Field(False, description="Prepend the input to generated_text.")
    stop: list[str] = Field(default_factory=list)
    seed: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    truncate: int | None = Field(None, description="Keep only the last `truncate` input tokens.")
    typical_p: float | None = Field(None, description="Not supported; null or 1.0.")
    best_of: int | None = Field(None, description="Only 1 (or null) is supported.")
    watermark: bool = Field(False, description="Not supported; must be false.")
    details: bool = False
    decoder_input_details: bool = Field(
        False, description="List the prompt tokens with their logprobs in details.prefill (the first one's is null).")
    return_k_alternatives: int | None = Field(None, description="LoRAX: alternatives per generated token.")
    top_n_tokens: int | None = Field(None, description="TGI: most likely tokens per step (top_tokens).")
    response_format: dict[str, Any] | None = Field(
        None, description='LoRAX: {"type": "json_object", "schema": {...}} constrains the output to the schema.')
    grammar: dict[str, Any] | None = Field(
        None, description='Constrain the output: {"type": "json", "value": schema} or {"type": "regex", "value": pattern}.')


class TGIRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, json_schema_extra={"examples": [
        {"inputs": "What is LLaMA-Adapter?", "parameters": {"max_new_tokens": 32, "details": True}},
        {"inputs": "Translate to French: cheese", "adapter_id": "my-adapter@2",
         "parameters": {"do_sample": True, "temperature": 0.7, "top_p": 0.9, "seed": 1, "stop": ["\n"]}},
    ]})

    inputs: str = Field(..., min_length=1)
    parameters: TGIParameters = Field(default_factory=TGIParameters)
    stream: bool = Field(False, description="Only used by the compat route POST /.")
    adapter_id: str | None = Field(None, description="Same as parameters.adapter_id (either place).")


class InputToken(BaseModel):
    id: int
    text: str
    logprob: float | None = None


class AlternativeToken(BaseModel):
    id: int
    text: str
    logprob: float


class Token(BaseModel):
    id: int
    text: str
    logprob: float
    special: bool
    alternative_tokens: list[AlternativeToken] | None = None


class Details(BaseModel):
    finish_reason: TGIFinishReason
    prompt_tokens: int
    generated_tokens: int
    seed: int | None
    prefill: list[InputToken]
    tokens: list[Token]
    top_tokens: list[list[Token]] | None = None


class GenerateResponse(BaseModel):
    generated_text: str
    details: Details | None = None


class StreamDetails(BaseModel):
    finish_reason: TGIFinishReason
    prompt_tokens: int
    generated_tokens: int
    seed: int | None


class StreamResponse(BaseModel):
    """One SSE `data:` event; the last one carries generated_text and details."""

    token: Token
    top_tokens: list[Token] | None = None
    generated_text: str | None = None
    details: StreamDetails | None = None


class TGIError(BaseModel):
    """TGI's error body; `error_type` is what the clients dispatch on."""

    error: str
    error_type: Literal["validation", "overloaded", "generation", "not_found", "method_not_allowed",
                        "unavailable", "too_large", "auth", "rate_limited", "timeout", "storage"]
