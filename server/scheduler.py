"""Continuous-batching scheduler: pure Python bookkeeping, no tensors.

Running sequences occupy KV-cache slots 0..n-1 with no holes: when one finishes, the sequence
in the highest slot moves into the hole (the engine copies its cached K/V). A batch of
sequences in consecutive slots then reads the cache as views instead of gathering it.

Each step: every sequence whose prompt is cached decodes one token; the remaining token
budget goes to prompt chunks of sequences still in prefill (chunked prefill: a long prompt
is spread over several steps instead of stalling the decoders).
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from .types import EngineOverloadedError


@dataclass(eq=False)
class Sequence:
    """One request's position in the engine. `payload` holds what the engine attaches to it."""

    token_ids: list[int]            # prompt, then generated tokens
    n_prompt: int
    payload: Any = None
    slot: int = -1                  # -1 while waiting
    n_cached: int = 0               # tokens whose K/V are in the cache
    order: int = field(default_factory=itertools.count().__next__)   # arrival order
    cancelled: bool = False

    @property
    def in_prefill(self) -> bool:
        return self.n_cached < self.n_prompt


@dataclass
class StepPlan:
    decode: list[Sequence]                       # one token each, ordered by slot
    prefill: list[tuple[Sequence, int]]          # (sequence, chunk length), ordered by slot

    @property
    def empty(self) -> bool:
        return not self.decode and not self.prefill


@dataclass
class SlotMove:
    seq: Sequence
    src: int
    dst: int


class Scheduler:
    def __init__(self, max_batch: int, max_tokens_per_step: int, max_queue: int):
        self.max_batch = max_batch
        self.max_tokens_per_step = max_tokens_per_step
        self.max_queue = max_queue
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []        # running[i].slot == i

    def check_room(self) -> None:
        if len(self.waiting) >= self.max_queue:
            raise EngineOverloadedError(
                f"engine overloaded: {len(self.waiting)} requests already waiting (max_queue)")

    def add(self, seq: Sequence) -> None:
        self.check_room()
        self.waiting.append(seq)

    def admit(self) -> list[Sequence]:
        """Move waiting sequences into free slots; returns the newly admitted ones."""
        admitted = []
        while self.waiting and len(self.running) < self.max_batch:
            seq = self.waiting.popleft()
            seq.slot = len(self.running)
            self.running.append(seq)
            admitted.append(seq)
        return admitted

    def plan(self) -> StepPlan:
        decode = [s for s in self.running if not s.in_prefill]
        budget = self.max_tokens_per_step - len(decode)
        # Prefill rows share one forward padded to a common chunk width, so rows × width must
        # fit the budget. Take the oldest k prompts and the width that completes the most
        # prompts (their first token comes next), then moves the most real prompt tokens; a
        # short leftover must not shrink everyone's chunk to its size.
        queue = sorted((s for s in self.running if s.in_prefill), key=lambda s: s.order)
        remaining = [s.n_prompt - s.n_cached for s in queue]
        best, best_k, best_width, longest = (0, 0), 0, 0, 0
        for k in range(1, len(queue) + 1):
            longest = max(longest, remaining[k - 1])
            width = min(longest, budget // k)
            if width == 0:
                break
            score = (sum(r <= width for r in remaining[:k]), sum(min(r, width) for r in remaining[:k]))
            if score > best:
                best, best_k, best_width = score, k, width
        prefill = sorted(((s, min(r, best_width)) for s, r in zip(queue[:best_k], remaining)),
                         key=lambda p: p[0].slot)
        return StepPlan(decode, prefill)

    def remove(self, seq: Sequence) -> SlotMove | None:
        """Take a sequence out (finished or cancelled); returns the slot move that fills its hole."""
        if seq.slot < 0:
            self.waiting.remove(seq)
            return None
        hole = seq.slot
        seq.slot = -1
        last = self.running.pop()
        if last is seq:
            return None
        self.running[hole] = last
        move = SlotMove(last, last.slot, hole)
        last.slot = hole
        return move

    @property
    def free_slots(self) -> int:
        return self.max_batch - len(self.running)
