"""Continuous batching over a paged KV cache: pure Python bookkeeping, no tensors.

The scheduler owns the cache's blocks (`BlockPool`) and decides, each step, who runs:

1. every running sequence whose prompt is cached decodes one token; one that needs a new
   block and finds none free preempts the newest running sequence (its blocks are freed and
   it goes back to the front of the queue, to be recomputed later, generated tokens included);
2. waiting sequences are admitted, oldest first, while a row is free (`max_batch`) and the
   blocks for their whole prompt are free (prefix-cache hits need none);
3. the token budget left after decoding goes to prompt chunks (chunked prefill: a long prompt
   is spread over several steps instead of stalling the decoders).

Prefix caching: a full block's content is named by a hash chained over every token before it
and rooted in the sequence's `prefix_root` (the base model, or one exact adapter version:
beyond the first adapted layer the adapter shapes the K/V). A cached block whose last user
finished stays in the cache, least recently used first out, until its block is needed. A
waiting sequence whose next prompt block is being computed right now by a running sequence
with the same chain waits for it instead of computing it again (bursts sharing a system
prompt, `n > 1` fan-out), while the sequences behind it are admitted.
"""

from __future__ import annotations

import hashlib
import itertools
from array import array
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

from .types import EngineOverloadedError


@dataclass(eq=False)
class Sequence:
    """One request's position in the engine. `payload` holds what the engine attaches to it."""

    token_ids: list[int]            # prompt, then generated tokens
    n_prompt: int
    payload: Any = None
    prefix_root: bytes = b""        # what shapes its K/V (see prefix_root())
    takes_prefix_hits: bool = True  # False: every prompt token is computed (prompt logprobs)
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)   # of its full blocks, in order
    n_cached: int = 0               # tokens whose K/V are in the cache
    prefill_len: int = 0            # tokens to cache before the next sample (set on admission)
    running: bool = False
    preemptions: int = 0
    prefix_hit_tokens: int = 0      # tokens served by the prefix cache at the last admission
    order: int = field(default_factory=itertools.count().__next__)   # arrival order

    @property
    def in_prefill(self) -> bool:
        return self.n_cached < self.prefill_len


@dataclass
class StepPlan:
    decode: list[Sequence]                       # one token each
    prefill: list[tuple[Sequence, int]]          # (sequence, chunk length)
    preempted: list[Sequence] = field(default_factory=list)
    admitted: list[Sequence] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.decode and not self.prefill


def block_hash(parent: bytes, tokens: list[int]) -> bytes:
    return hashlib.blake2b(parent + array("q", tokens).tobytes(), digest_size=16).digest()


def prefix_root(identity: str) -> bytes:
    """The root of a hash chain: 'base' or an exact adapter version (name, version, content hash)."""
    return hashlib.blake2b(identity.encode(), digest_size=16).digest()


class BlockPool:
    """Block ids with reference counts, a free list and the prefix cache's LRU of idle blocks."""

    def __init__(self, n_blocks: int, prefix_caching: bool = True):
        self.n_blocks = n_blocks
        self.prefix_caching = prefix_caching
        self._free = list(range(n_blocks - 1, -1, -1))   # pop() hands out low ids first
        self._refs = [0] * n_blocks
        self._hash_of: list[bytes | None] = [None] * n_blocks
        self._by_hash: dict[bytes, int] = {}
        self._idle: OrderedDict[int, None] = OrderedDict()   # cached, unreferenced; LRU first
        self.evictions = 0

    @property
    def n_free(self) -> int:
        """Blocks that can be handed out now (free, or idle cached blocks to evict)."""
        return len(self._free) + len(self._idle)

    @property
    def n_cached_idle(self) -> int:
        return len(self._idle)

    def allocate(self) -> int | None:
        if self._free:
            block = self._free.pop()
        elif self._idle:
            block, _ = self._idle.popitem(last=False)
            del self._by_hash[self._hash_of[block]]
            self._hash_of[block] = None
            self.evictions += 1
        else:
            return None
        self._refs[block] = 1
        return block

    def release(self, block: int) -> None:
        self._refs[block] -= 1
        if self._refs[block] == 0:
            if self._hash_of[block] is not None:
                self._idle[block] = None          # most recently used at the end
            else:
                self._free.append(block)

    def peek(self, h: bytes) -> int | None:
        return self._by_hash.get(h)

    def is_idle(self, block: int) -> bool:
        return self._refs[block] == 0

    def take(self, block: int) -> None:
        """One more user of a cached block (a prefix-cache hit)."""
        if self._refs[block] == 0:
            del self._idle[block]
        self._refs[block] += 1

    def register(self, block: int, h: bytes) -> None:
        """A full block's K/V are computed: let other sequences with the same chain reuse it."""
        if self.prefix_caching and self._hash_of[block] is None and h not in self._by_hash:
            self._hash_of[block] = h
            self._by_hash[h] = block

    def all_free(self) -> bool:
        return self.n_free == self.n_blocks and not any(self._refs)


class Scheduler:
    def __init__(self, max_batch: int, max_tokens_per_step: int, max_queue: int,
                 n_blocks: int, block_size: int, prefix_caching: bool = True):
        self.max_batch = max_batch
        self.max_tokens_per_step = max_tokens_per_step
        self.max_queue = max_queue
        self.block_size = block_size
        self.blocks = BlockPool(n_blocks, prefix_caching)
        # Admission leaves this many blocks for running sequences to grow into, so a newly
        # admitted prompt is not preempted at once (never applies to an otherwise idle engine).
        self.watermark = max(1, n_blocks // 100)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []        # admission order: the last is the newest
        self.preemptions_total = 0
        self.blocks_used_peak = 0
        # Hashes of full prompt blocks a running sequence is computing now → that sequence.
        self._in_flight: dict[bytes, Sequence] = {}

    @property
    def capacity_tokens(self) -> int:
        return self.blocks.n_blocks * self.block_size

    def check_room(self) -> None:
        if len(self.waiting) >= self.max_queue:
            raise EngineOverloadedError(
                f"engine overloaded: {len(self.waiting)} requests already waiting (max_queue)")

    def add(self, seq: Sequence) -> None:
        self.check_room()
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out (finished or cancelled) and free its blocks."""
        if seq.running:
            self.running.remove(seq)
            self._free_blocks(seq)
        else:
            self.waiting.remove(seq)

    # ---- one step ------------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        decode, preempted = self._grow_decoders()
        admitted = self._admit() if not preempted else []
        self.blocks_used_peak = max(self.blocks_used_peak, self.blocks_used)
        return StepPlan(decode, self._plan_prefill(len(decode)), preempted, admitted)

    def _grow_decoders(self) -> tuple[list[Sequence], list[Sequence]]:
        """Give each decoding sequence the slot of its next token, oldest first, preempting the
        newest sequences when the blocks run out."""
        decode, preempted = [], []
        for seq in list(self.running):
            if not seq.running or seq.in_prefill:
                continue
            while seq.n_cached // self.block_size >= len(seq.block_table):
                block = self.blocks.allocate()
                if block is not None:
                    seq.block_table.append(block)
                    continue
                victim = self.running[-1]
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            if seq.running:
                decode.append(seq)
        return decode, preempted

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._free_blocks(seq)
        seq.preemptions += 1
        self.preemptions_total += 1
        self.waiting.appendleft(seq)

    def _free_blocks(self, seq: Sequence) -> None:
        for h in seq.block_hashes:
            if self._in_flight.get(h) is seq:
                del self._in_flight[h]
        # Tail blocks first, so the LRU evicts a prompt's end before its shared beginning.
        for block in reversed(seq.block_table):
            self.blocks.release(block)
        seq.block_table = []
        seq.n_cached = 0
        seq.running = False

    def _admit(self) -> list[Sequence]:
        bs = self.block_size
        admitted = []
        for seq in list(self.waiting):
            if len(self.running) >= self.max_batch:
                break
            target = len(seq.token_ids)
            hits = self._prefix_hits(seq, target)
            if self._next_block_in_flight(seq, target, len(hits)):
                continue
            idle_hits = sum(self.blocks.is_idle(b) for b in hits)
            n_blocks = -(-target // bs)
            needed = n_blocks - len(hits) + idle_hits
            reserve = self.watermark if self.running else 0
            if needed > self.blocks.n_free - reserve:
                break
            self.waiting.remove(seq)
            for b in hits:
                self.blocks.take(b)
            seq.block_table = hits + [self.blocks.allocate() for _ in range(n_blocks - len(hits))]
            seq.n_cached = seq.prefix_hit_tokens = len(hits) * bs
            seq.prefill_len = target
            seq.running = True
            self.running.append(seq)
            admitted.append(seq)
            if self.blocks.prefix_caching:
                for h in self._chain(seq, target // bs)[len(hits):]:
                    self._in_flight.setdefault(h, seq)
        return admitted

    def _next_block_in_flight(self, seq: Sequence, target: int, n_hits: int) -> bool:
        if not (seq.takes_prefix_hits and self.blocks.prefix_caching):
            return False
        chain = self._chain(seq, (target - 1) // self.block_size)
        return n_hits < len(chain) and chain[n_hits] in self._in_flight

    def _prefix_hits(self, seq: Sequence, target: int) -> list[int]:
        """Cached blocks for the sequence's leading full blocks (at least one token is left to
        compute: its logits give the next token)."""
        bs = self.block_size
        if not (seq.takes_prefix_hits and self.blocks.prefix_caching):
            return []
        hits = []
        for h in self._chain(seq, (target - 1) // bs):
            block = self.blocks.peek(h)
            if block is None:
                break
            hits.append(block)
        return hits

    def _chain(self, seq: Sequence, n_blocks: int) -> list[bytes]:
        """The sequence's block hashes up to n_blocks full blocks (computed once, then kept)."""
        bs = self.block_size
        root = seq.prefix_root
        while len(seq.block_hashes) < n_blocks:
            i = len(seq.block_hashes)
            parent = seq.block_hashes[-1] if i else root
            seq.block_hashes.append(block_hash(parent, seq.token_ids[i * bs:(i + 1) * bs]))
        return seq.block_hashes[:n_blocks]

    def cached(self, seq: Sequence, n_tokens: int) -> None:
        """The forward stored n_tokens more of the sequence's K/V: offer its newly full blocks."""
        before = seq.n_cached // self.block_size
        seq.n_cached += n_tokens
        after = seq.n_cached // self.block_size
        if after > before and self.blocks.prefix_caching:
            for i, h in enumerate(self._chain(seq, after)[before:], before):
                self.blocks.register(seq.block_table[i], h)
                if self._in_flight.get(h) is seq:
                    del self._in_flight[h]

    def _plan_prefill(self, n_decode: int) -> list[tuple[Sequence, int]]:
        budget = self.max_tokens_per_step - n_decode
        # Prefill rows share one forward padded to a common chunk width, so rows × width must
        # fit the budget. Take the oldest k prompts and the width that completes the most
        # prompts (their first token comes next), then moves the most real prompt tokens; a
        # short leftover must not shrink everyone's chunk to its size.
        queue = sorted((s for s in self.running if s.in_prefill), key=lambda s: s.order)
        remaining = [s.prefill_len - s.n_cached for s in queue]
        best, best_k, best_width, longest = (0, 0), 0, 0, 0
        for k in range(1, len(queue) + 1):
            longest = max(longest, remaining[k - 1])
            width = min(longest, budget // k)
            if width == 0:
                break
            score = (sum(r <= width for r in remaining[:k]), sum(min(r, width) for r in remaining[:k]))
            if score > best:
                best, best_k, best_width = score, k, width
        return [(s, min(r, best_width)) for s, r in zip(queue[:best_k], remaining)]

    # ---- figures -------------------------------------------------------------------------
    @property
    def blocks_used(self) -> int:
        return self.blocks.n_blocks - self.blocks.n_free
