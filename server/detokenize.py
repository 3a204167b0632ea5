"""Streaming text from generated token ids: incremental detokenization and stop-string holdback.

Byte-level BPE pieces and sentencepiece byte-fallback tokens can end in the middle of a
multi-byte UTF-8 character; decoding them alone yields U+FFFD. So each step decodes a short
window of recent tokens twice — without and with the new tokens — and emits the difference
only once it no longer ends in an incomplete character. Starting the window a few tokens back
(into the prompt at first) also keeps sentencepiece's leading-space handling right.
"""

from __future__ import annotations

_REPLACEMENT = "\ufffd"
_PROMPT_CONTEXT = 5   # prompt tokens used as left context for the first generated tokens


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_ids: list[int]):
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids[-_PROMPT_CONTEXT:])
        self.prefix_offset = 0              # window start (a character boundary)
        self.read_offset = len(self.ids)    # tokens before this are already emitted as text

    def add(self, token_id: int) -> str:
        """Append one token; return the newly complete text (possibly "")."""
        self.ids.append(token_id)
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset])
        full = self.tokenizer.decode(self.ids[self.prefix_offset:])
        if len(full) <= len(prefix) or full.endswith(_REPLACEMENT):
            return ""       # nothing new yet, or a character still incomplete: wait for more
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return full[len(prefix):]

    def flush(self) -> str:
        """At the end of generation: whatever is still held back (invalid bytes decode as U+FFFD)."""
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset])
        full = self.tokenizer.decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return full[len(prefix):] if len(full) > len(prefix) else ""


class StopStringMatcher:
    """Holds back text that could be the start of a stop string, so a stream never shows one.

    It holds back the longest end of the text that could still grow into a stop string, so a
    match can never start inside text already emitted: it lies entirely within the buffer.
    """

    def __init__(self, stops: list[str]):
        self.stops = list(stops)
        self.buffer = ""

    def push(self, text: str) -> tuple[str, str | None]:
        """Add new text → (text safe to emit now, the stop string matched or None).

        After a match the caller must stop; the matched string and anything after it are dropped.
        """
        if not self.stops:
            return text, None
        self.buffer += text
        first: tuple[int, str] | None = None
        for s in self.stops:
            i = self.buffer.find(s)
            if i >= 0 and (first is None or i < first[0]):
                first = (i, s)
        if first is not None:
            emit, self.buffer = self.buffer[:first[0]], ""
            return emit, first[1]
        hold = self._held_suffix_len()
        emit = self.buffer[:len(self.buffer) - hold]
        self.buffer = self.buffer[len(self.buffer) - hold:]
        return emit, None

    def flush(self) -> str:
        out, self.buffer = self.buffer, ""
        return out

    def _held_suffix_len(self) -> int:
        """Length of the longest buffer suffix that is a proper prefix of some stop string."""
        best = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.buffer)), best, -1):
                if self.buffer.endswith(s[:n]):
                    best = n
                    break
        return best
