"""Structured output: a grammar per request turns into a token mask per decoding step.

Built on llguidance (the Rust engine behind vLLM's and llama.cpp's guided decoding): it reads
the HF `tokenizers` JSON this project already loads, compiles JSON schemas and regexes
lazily (no whole-vocabulary index up front), and fills the masks of all constrained rows of a
batch in parallel. Measured on SmolLM2's 49152-token vocabulary, 32 rows, a small JSON
schema: ~0.6 ms per step for all 32 masks on a loaded 2-core machine — next to a decode step
of tens of ms. (xgrammar was ~0.4 ms but needs transformers and triton at run time;
outlines-core precompiles an index over the whole vocabulary per schema.)

The engine's EOS/stop ids are the grammar's end token: the mask allows them only once the
output is complete, and a complete output (nothing more can follow) ends the request.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict

import llguidance
import numpy as np
import torch

from .types import Grammar, InvalidRequestError


_COMPILED_KEPT = 64


class GrammarCompiler:
    """Turns a `Grammar` into a fresh matcher for one request (any thread)."""

    def __init__(self, tokenizer, vocab_size: int):
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._ll_tokenizer: llguidance.LLTokenizer | None = None
        self._lock = threading.Lock()
        # Recently compiled grammars, as fresh matchers to copy: n choices or a client repeating
        # its schema compile it once.
        self._compiled: OrderedDict[tuple[str, str], llguidance.LLMatcher] = OrderedDict()

    def _tokenizer_for_grammars(self) -> llguidance.LLTokenizer:
        with self._lock:        # built once (~0.4 s), on the first constrained request
            if self._ll_tokenizer is None:
                backend = getattr(self._tokenizer, "backend_json", None)
                if backend is None:
                    raise InvalidRequestError("grammar", "structured output needs a model with an HF "
                                              "tokenizer.json (this model's tokenizer is sentencepiece)")
                self._ll_tokenizer = llguidance.LLTokenizer(
                    backend(), n_vocab=self.vocab_size, eos_token=sorted(self._tokenizer.stop_ids))
            return self._ll_tokenizer

    def matcher(self, grammar: Grammar) -> "GrammarMatcher":
        """Raises InvalidRequestError("grammar", why) for a schema or regex that does not compile."""
        try:
            key = (grammar.kind, json.dumps(grammar.value, sort_keys=True))
        except (TypeError, ValueError):
            raise InvalidRequestError("grammar", "the grammar's value must be JSON") from None
        with self._lock:
            template = self._compiled.get(key)
            if template is not None:
                self._compiled.move_to_end(key)
        if template is None:
            template = self._compile(grammar)
            with self._lock:
                self._compiled[key] = template
                if len(self._compiled) > _COMPILED_KEPT:
                    self._compiled.popitem(last=False)
        return GrammarMatcher(template.deep_copy())

    def _compile(self, grammar: Grammar) -> llguidance.LLMatcher:
        if grammar.kind == "json":
            if not isinstance(grammar.value, dict):
                raise InvalidRequestError("grammar", "a JSON schema must be a JSON object")
            try:
                text = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(grammar.value))
            except ValueError as e:
                raise InvalidRequestError("grammar", f"invalid JSON schema: {e}") from None
        elif grammar.kind == "regex":
            if not isinstance(grammar.value, str):
                raise InvalidRequestError("grammar", "a regex grammar must be a string")
            text = llguidance.LLMatcher.grammar_from_regex(grammar.value)
        else:
            raise InvalidRequestError("grammar", f"unknown grammar kind {grammar.kind!r} (json or regex)")
        tokenizer = self._tokenizer_for_grammars()
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(text, tokenizer)
        if is_error:
            raise InvalidRequestError("grammar", f"invalid {grammar.kind} grammar: {messages[0]}")
        matcher = llguidance.LLMatcher(tokenizer, text, log_level=0)
        if matcher.is_error():
            raise InvalidRequestError("grammar", f"invalid {grammar.kind} grammar: {matcher.get_error()}")
        return matcher


class GrammarMatcher:
    """The grammar state of one request: which tokens may come next, and whether it is done."""

    def __init__(self, matcher: llguidance.LLMatcher):
        self._m = matcher

    def consume(self, token_id: int) -> bool:
        """Advance by the sampled token → True when the output is complete (nothing may follow)."""
        if not self._m.consume_token(token_id):
            raise RuntimeError(f"grammar rejected token {token_id}: {self._m.get_error()}")
        return self._m.is_stopped()


_EXECUTOR = llguidance.LLExecutor()        # a pool of Rust threads shared by all batches


def allowed_tokens(matchers: list[GrammarMatcher], vocab_size: int) -> tuple[torch.Tensor, list[str | None]]:
    """Masks for all rows at once → (bool [R, vocab_size] of allowed tokens, per-row error or None).

    Host-side work stays in numpy (single-threaded, no torch thread-pool wake-ups: on a busy
    CPU each small torch op here cost ~20 ms); the caller applies the mask in one torch op."""
    words = (vocab_size + 31) // 32
    bits = np.zeros((len(matchers), words), dtype=np.int32)
    # Rows are filled in parallel (Rust threads, without the GIL); a row in an error state gets
    # an empty mask, which the checks below report for that row alone.
    _EXECUTOR.unsafe_compute_mask_ptr([(m._m, i) for i, m in enumerate(matchers)], bits.ctypes.data,
                                      words * 4, len(matchers))
    # Bit j of word w is token 32·w + j: little-endian bytes, little-endian bits.
    allowed = np.unpackbits(bits.view(np.uint8), axis=1, bitorder="little")[:, :vocab_size].view(np.bool_)
    errors = [m._m.get_error() or None for m in matchers]
    errors = [e if e or ok else "the grammar allows no next token" for e, ok in zip(errors, allowed.any(axis=1))]
    return torch.from_numpy(allowed), errors
