"""Wire schemas of the OpenAI-compatible API (`/v1/chat/completions`, `/v1/completions`, `/v1/models`).

The adapter is chosen by `model`: the base model's id means no adapter, "name" the adapter's
latest version, "name@N" version N. Fields OpenAI defines that this server cannot honour are
declared so that a non-default value is refused with a 400 naming it; unknown fields are
ignored, as OpenAI-compatible servers do. Types are strict: `"4"` is not a number.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field


COMPLETIONS_DEFAULT_MAX_TOKENS = 16   # OpenAI's default for /v1/completions (also for an explicit null)


class StreamOptions(BaseModel):
    include_usage: bool = False


class TextContentPart(BaseModel):
    type: Literal["text"]
    text: str


class ImageUrl(BaseModel):
    url: str = Field(..., description="data:image/png;base64,... (PNG, JPEG, WebP, single-frame GIF); "
                                      "http(s) only on a server started with --allow-remote-images.")
    detail: Literal["auto", "low", "high"] | None = Field(
        None, description="Accepted and ignored: the vision model sees every image at its own resolution.")


class ImageContentPart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageUrl


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[Annotated[TextContentPart | ImageContentPart, Field(discriminator="type")]] | None = Field(
        None, description="Text, or content parts: text parts are joined; an image_url part conditions a "
                          "llama-adapter-visual adapter's prompts and takes no place in the token stream.")
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content if isinstance(part, TextContentPart))
        return self.content or ""

    def image_urls(self) -> list[str]:
        if isinstance(self.content, list):
            return [part.image_url.url for part in self.content if isinstance(part, ImageContentPart)]
        return []


class SamplingFields(BaseModel):
    """Fields shared by chat and legacy completions."""

    model_config = ConfigDict(extra="ignore", strict=True)

    model: str = Field(..., description="Base model id, or adapter 'name' / 'name@version'.")
    temperature: float | None = Field(None, description="0 = greedy; default 1.")
    top_p: float | None = None
    n: int = Field(1, description="Choices per prompt, 1..16; each choice i samples with its own seed "
                                  "derived from `seed` and i.")
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(None, description="Only 0 (or null) is supported.")
    frequency_penalty: float | None = Field(None, description="Only 0 (or null) is supported.")
    logit_bias: dict[str, float] | None = Field(
        None, description="Token id → bias in [-100, 100], added to that token's logit before choosing.")
    user: str | None = None
    # Extensions other OpenAI-compatible servers (vLLM) accept as well.
    top_k: int | None = Field(None, description="Extension: 0 = off.")
    repetition_penalty: float | None = Field(None, description="Extension: 1 = off.")
    ignore_eos: bool = Field(False, description="Extension: do not stop at the end-of-sequence token.")


class ChatCompletionRequest(SamplingFields):
    model_config = ConfigDict(extra="ignore", json_schema_extra={"examples": [
        {"model": "my-adapter", "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 32,
         "temperature": 0, "stream": True, "stream_options": {"include_usage": True}},
    ]})

    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = Field(None, description="Preferred over max_tokens when both are set.")
    logprobs: bool = False
    top_logprobs: int | None = Field(None, description="0..20; needs logprobs=true.")
    response_format: dict[str, Any] | None = Field(
        None, description="{'type': 'text'}, {'type': 'json_object'} or {'type': 'json_schema', "
                          "'json_schema': {'name': ..., 'schema': {...}}}: the output is constrained to match.")
    tools: list[dict[str, Any]] | None = Field(None, description="Not supported; must be empty.")
    tool_choice: str | dict[str, Any] | None = Field(None, description="Only 'none' (or null) is supported.")


class CompletionRequest(SamplingFields):
    model_config = ConfigDict(extra="ignore", json_schema_extra={"examples": [
        {"model": "my-adapter@1", "prompt": "Once upon a time", "max_tokens": 16, "logprobs": 2},
    ]})

    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        ..., description="Text, token ids, or a list of either (one choice group per prompt).")
    max_tokens: int | None = Field(COMPLETIONS_DEFAULT_MAX_TOKENS, description="null = 16, as OpenAI.")
    logprobs: int | None = Field(None, description="0..20 alternatives per token (legacy format).")
    echo: bool = Field(False, description="Prepend the prompt to the returned text; with logprobs, "
                                          "the prompt's tokens are scored too (first one null).")
    suffix: str | None = Field(None, description="Not supported; must be null.")
    best_of: int | None = Field(None, description="Generate best_of ≥ n choices per prompt (≤ 16), return "
                                                  "the n with the highest cumulative logprob; not streamed.")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length"]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]            # null for an echoed prompt's first token
    top_logprobs: list[dict[str, float] | None] | None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None


class Completion(BaseModel):
    """Both the whole answer and (with finish_reason null until the end) each streamed chunk."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    root: str = Field(..., description="For an adapter: 'name@latest version'; for the base: its id.")
    parent: str | None = Field(None, description="For an adapter: the base model's id.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
