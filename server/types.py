"""Plain data passed between the HTTP layer and the engine (no torch, no HTTP here).

The engine API itself (`Engine`, `RequestHandle`) lives in `server/engine.py`:

    engine = Engine(loaded, registry, EngineConfig(...)); engine.start()
    handle = engine.submit(GenerationRequest(prompt_ids, SamplingParams(...), adapter="name@2"))
        # raises synchronously: AdapterNotFoundError (adapters.registry, a LookupError),
        # EngineOverloadedError, InvalidRequestError, EngineClosedError
    async for event in handle: ...          # TokenEvent per generated token
    result = await handle.result()          # GenerationResult (raises EngineError on a crash)
    handle.cancel()                         # finish_reason "cancelled", blocks freed within one step
    engine.add_completion_callback(fn)      # fn(result) for every finished request (metrics)
    engine.shutdown(graceful=True)
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Literal

if TYPE_CHECKING:
    from PIL.Image import Image

FinishReason = Literal["length", "stop", "eos_token", "cancelled"]


class InvalidRequestError(ValueError):
    """A request parameter is out of range; `.field` names it (for 422 / 400 answers)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class EngineOverloadedError(RuntimeError):
    """The waiting queue is full; retry later (HTTP 503 / 429)."""


class EngineClosedError(RuntimeError):
    """The engine is shutting down or stopped and takes no new requests."""


class EngineError(RuntimeError):
    """The engine failed while running a request (a bug or a device error), not the caller's fault."""


@dataclass(frozen=True)
class Grammar:
    """What the output must match: kind "json" (value: a JSON schema, {} = any JSON value) or
    "regex" (value: the pattern, matched by the whole output)."""

    kind: Literal["json", "regex"]
    value: Any


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 1.0            # 0 (or below GREEDY_BELOW) = greedy
    top_p: float = 1.0                  # 1 = off
    top_k: int = 0                      # 0 = off
    repetition_penalty: float = 1.0     # 1 = off; CTRL-style over prompt + generated tokens
    seed: int | None = None             # None = the engine picks one and reports it
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False            # when True the tokenizer's stop ids do not end generation
    top_logprobs: int = 0               # alternatives reported per generated token
    prompt_logprobs: int | None = None  # None = off; N ≥ 0 = each prompt token's logprob + top-N
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id → added to its logit
    grammar: Grammar | None = None      # constrain the output (structured output)

    # Logits divided by a smaller temperature overflow float32 (softmax → NaN); the distribution
    # is one-hot long before that, so these count as greedy (vLLM draws the same line).
    GREEDY_BELOW = 1e-5
    MAX_TOP_LOGPROBS = 20
    MAX_STOP_STRINGS = 16
    MAX_STOP_CHARS = 256
    # Ranges that keep every logit finite: the penalty multiplies negative logits (and divides
    # positive ones) of seen tokens, then the temperature divides them all; with these bounds a
    # float32 logit of magnitude up to 1e30 stays finite, far beyond anything a model emits.
    MAX_TEMPERATURE = 100.0
    REPETITION_PENALTY_RANGE = (0.01, 100.0)

    def validate(self) -> None:
        def bad(name: str, message: str):
            raise InvalidRequestError(name, message)

        # Prompt scoring (echo + logprobs, max_tokens 0) asks for no generated token at all.
        least = 0 if self.prompt_logprobs is not None else 1
        if not _int(self.max_new_tokens) or self.max_new_tokens < least:
            bad("max_new_tokens", f"must be an integer ≥ {least}, got {self.max_new_tokens!r}")
        if not _finite(self.temperature) or not 0 <= self.temperature <= self.MAX_TEMPERATURE:
            bad("temperature", f"must be in [0, {self.MAX_TEMPERATURE:g}] (0 = greedy), got {self.temperature!r}")
        if not _finite(self.top_p) or not 0 < self.top_p <= 1:
            bad("top_p", f"must be in (0, 1], got {self.top_p!r}")
        if not _int(self.top_k) or self.top_k < 0:
            bad("top_k", f"must be an integer ≥ 0 (0 = off), got {self.top_k!r}")
        low, high = self.REPETITION_PENALTY_RANGE
        if not _finite(self.repetition_penalty) or not low <= self.repetition_penalty <= high:
            bad("repetition_penalty", f"must be in [{low:g}, {high:g}] (1 = off), got {self.repetition_penalty!r}")
        if self.seed is not None and (not _int(self.seed) or not 0 <= self.seed < 2 ** 63):
            bad("seed", f"must be an integer in [0, 2^63), got {self.seed!r}")
        if len(self.stop) > self.MAX_STOP_STRINGS:
            bad("stop", f"at most {self.MAX_STOP_STRINGS} stop strings")
        if any(not isinstance(s, str) or not 0 < len(s) <= self.MAX_STOP_CHARS for s in self.stop):
            bad("stop", f"stop strings must be non-empty strings of at most {self.MAX_STOP_CHARS} characters")
        for s in self.stop:
            check_text("stop", s)
        if any(not _int(t) or t < 0 for t in self.stop_token_ids):
            bad("stop_token_ids", "must be non-negative integers")
        if not _int(self.top_logprobs) or not 0 <= self.top_logprobs <= self.MAX_TOP_LOGPROBS:
            bad("top_logprobs", f"must be an integer in [0, {self.MAX_TOP_LOGPROBS}]")
        if self.prompt_logprobs is not None and (
                not _int(self.prompt_logprobs) or not 0 <= self.prompt_logprobs <= self.MAX_TOP_LOGPROBS):
            bad("prompt_logprobs", f"must be an integer in [0, {self.MAX_TOP_LOGPROBS}]")
        for token, bias in self.logit_bias.items():
            if not _int(token) or token < 0:
                bad("logit_bias", f"keys must be token ids ≥ 0, got {token!r}")
            if not _finite(bias) or not -100 <= bias <= 100:
                bad("logit_bias", f"token {token}: bias must be in [-100, 100], got {bias!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < self.GREEDY_BELOW


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_text(field: str, text: str) -> None:
    """Text from a client must be valid Unicode: a lone surrogate (JSON lets `"\\udfff"` through)
    cannot be tokenized, matched as UTF-8, or written back out."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidRequestError(field, f"invalid Unicode at character {e.start}: a lone surrogate "
                                         f"{text[e.start]!r}") from None


@dataclass(frozen=True)
class ImageInput:
    """An image a request carries (server/images.py builds it): decoded, RGB, within the
    server's size limits. It conditions a `llama-adapter-visual` adapter's prompts."""

    image: "Image"                      # PIL image, mode RGB
    sha256: str                         # of the bytes the client sent (feature cache key)


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    adapter: str | None = None          # "name" (latest version) or "name@N"; None = base model
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    tenant: str | None = None           # the API key's tenant (set by the auth layer; metrics label)
    images: tuple[ImageInput, ...] = () # only with a llama-adapter-visual adapter (exactly one image)


@dataclass(frozen=True)
class TokenEvent:
    token_id: int
    text: str                           # newly visible text; never a partial stop string or broken UTF-8
    logprob: float                      # log-softmax of the raw logits (before temperature etc.)
    top_logprobs: list[tuple[int, float]]
    special: bool


@dataclass
class GenerationResult:
    request_id: str
    text: str                           # generated text, stop string (if any) excluded
    token_ids: list[int]                # generated tokens, incl. a final stop/eos token
    logprobs: list[float]
    top_logprobs: list[list[tuple[int, float]]]
    finish_reason: FinishReason
    prompt_tokens: int
    generated_tokens: int
    adapter_ref: str | None             # "name@N" actually used, None for the base model
    seed: int
    ttft_s: float                       # submit → first token
    latency_s: float                    # submit → finish
    # submit → first admitted to the running batch (waiting for a row or KV-cache blocks); the
    # rest of ttft_s is prompt processing, shared with the other rows' steps
    queue_s: float = 0.0
    stop_sequence: str | None = None    # the stop string that ended it, if any
    tenant: str | None = None           # the request's tenant, for metrics labels
    # With SamplingParams.prompt_logprobs: per prompt token (logprob, top-N alternatives);
    # the first token has no context, so its entry is (None, []).
    prompt_logprobs: list[tuple[float | None, list[tuple[int, float]]]] | None = None


CompletionCallback = Callable[[GenerationResult], None]


@dataclass
class EngineConfig:
    max_batch: int = 64                 # running sequences = rows per decode step
    max_seq_len: int = 2048             # prompt + generated tokens per sequence
    # Prompt tokens + decode tokens in one step (chunked prefill). 2048, vLLM-CPU's server default:
    # under 32 concurrent 400-token prompts, 512 (one prompt a step) ran a decode forward beside
    # every 400-token chunk (62 steps); 2048 (five a step, 38 steps) measured 29% more tokens per
    # CPU-second and TTFT p95 34% lower (p50 11%), with decode steps ~3× further apart while
    # prompts wait.
    max_tokens_per_step: int = 2048
    max_queue: int = 256                # waiting requests beyond the running batch
    # KV-cache size: bytes (int ≥ 1), or a fraction in (0, 1) of the free device memory (CUDA).
    # None: on CPU what 8 sequences of the model's context (at most DEFAULT_MAX_SEQ_LEN, at least
    # max_seq_len) need (reserved, resident only once used); on CUDA 0.8 of the free memory.
    kv_cache_memory: int | float | None = None
    block_size: int = 16                # tokens per KV-cache block
    prefix_caching: bool = True         # reuse full prompt blocks across requests (same base/adapter version)
    device: str | None = None           # None = the loaded model's device; must match it if given
    dtype: str | None = None            # "float32" | "bfloat16" | "float16"; None = the model's
    compile: bool = False               # torch.compile the decode forward: for CUDA. On CPU inductor
                                        # cannot lower the packed oneDNN linears (it wants frozen
                                        # constant weights); with them wrapped as opaque custom ops it
                                        # compiled (11 min on the loaded 2-core box), and ran the
                                        # default model's 32-row decode 3–7× slower than eager
    cuda_graphs: bool = True            # CUDA: replay the decode step as CUDA graphs (no effect on CPU)
    image_feature_cache: int = 1024     # images whose vision features stay cached (LRU by content hash); 0 = off

    DEFAULT_CPU_SEQUENCES = 8           # the old slot cache's default size, in full-context sequences
    DEFAULT_MAX_SEQ_LEN = 4096          # serve's --max-seq-len when not given: the model's context, at most this
    DEFAULT_CUDA_FRACTION = 0.8

    def validate(self) -> None:
        for name in ("max_batch", "max_seq_len", "max_tokens_per_step", "max_queue", "block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"engine config {name} must be ≥ 1")
        if self.image_feature_cache < 0:
            raise ValueError("engine config image_feature_cache must be ≥ 0")
        if self.max_tokens_per_step < self.max_batch:
            raise ValueError("engine config max_tokens_per_step must be ≥ max_batch "
                             "(every running sequence decodes one token per step)")
        m = self.kv_cache_memory
        if m is not None and not (isinstance(m, int) and m >= 1 or isinstance(m, float) and 0 < m < 1):
            raise ValueError(f"engine config kv_cache_memory must be bytes ≥ 1 or a fraction in (0, 1), got {m!r}")


@dataclass
class EngineStats:
    running: int
    waiting: int
    kv_blocks_used: int                 # blocks held by running sequences
    kv_blocks_total: int
    kv_blocks_cached: int               # idle blocks kept for prefix hits (free to reuse)
    kv_block_size: int
    kv_cache_bytes: int
    tokens_generated_total: int
    prompt_tokens_total: int            # prompt tokens computed (prefix-cache hits excluded)
    requests_finished_total: int
    requests_cancelled_total: int
    steps_total: int
    preemptions_total: int = 0
    # Per adapter name (None = base model): prompt tokens admitted / of them served by the prefix cache.
    prefix_cache_queries: dict[str | None, int] = field(default_factory=dict)
    prefix_cache_hits: dict[str | None, int] = field(default_factory=dict)
    # Image-conditioned adapters (server/visual_prompts.py)
    images_encoded_total: int = 0       # images run through the vision tower
    image_encode_seconds: float = 0.0   # preprocessing + tower forwards
    image_feature_cache_hits: int = 0
    image_feature_cache_misses: int = 0
