"""Paged KV cache: fixed-size blocks of token slots, addressed through per-sequence block tables.

The cache is one preallocated pool of `n_blocks × block_size` token slots per layer; a
sequence owns a list of block ids (its block table) and its token at position p lives in slot
`table[p // block_size] * block_size + p % block_size`. Blocks are handed out and taken back
by the server's scheduler; this module only stores and reads. No allocation per token.

One extra block past the last (`scratch_block`) takes the writes of padding tokens, so a
padded row never writes into a block another sequence owns.

Memory is reserved untouched and each block is zeroed the first time a step uses it (`prepare`):
resident memory then grows with the blocks actually used, and attention never reads memory
that was never written (a NaN there would leak through the additive mask: 0 · NaN = NaN).
Only the step's own blocks are zeroed, not every block up to the highest id: a burst admits
many prompts at once, and the first decode step's new blocks come after all of theirs (32
prompts of 400 tokens: zeroing up to them took 1.0 s of one step, 500 MB of first touches).

On CPU the decode batch reads through `DecodeRows`: a contiguous copy of each running row's
keys/values, filled once when the row joins the batch and appended to every step, so a step
reads its context in place instead of gathering every block again (see DecodeRows).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable

import torch

BLOCK_SIZE = 16


class PagedKVCache:
    def __init__(self, n_layers: int, n_blocks: int, n_kv_heads: int, head_dim: int,
                 block_size: int = BLOCK_SIZE, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu"):
        if n_blocks < 1:
            raise ValueError("a KV cache needs at least one block")
        self.n_blocks, self.block_size = n_blocks, block_size
        # Layout [layer, slot, kv head, head dim]: a block is one contiguous run, so gathering a
        # row's blocks is a plain index_select, and [B, L, Hkv, D] → [B, Hkv, L, D] is a view
        # SDPA reads as it is (measured on CPU: ~1.8× faster than gathering a head-major layout,
        # whose result needs a transposing copy).
        shape = (n_layers, (n_blocks + 1) * block_size, n_kv_heads, head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.k[:, n_blocks * block_size:].zero_()        # the scratch block
        self.v[:, n_blocks * block_size:].zero_()
        self._zeroed = bytearray(n_blocks)     # per block: zeroed once already
        self._gathered: list[torch.Tensor | None] = [None, None]    # see _gather_buffer
        self.decode_rows = DecodeRows(self)
        if self.k.device.type != "cpu":     # resident anyway: zero it all now, not mid-step
            self.prepare(range(n_blocks))

    @classmethod
    def for_model(cls, model, n_blocks: int, block_size: int = BLOCK_SIZE) -> "PagedKVCache":
        cfg = model.config
        ref = model.tok_embeddings.weight
        return cls(cfg.n_layers, n_blocks, cfg.n_kv_heads, cfg.head_dim, block_size, ref.dtype, ref.device)

    @staticmethod
    def bytes_per_block(config, dtype: torch.dtype, block_size: int = BLOCK_SIZE) -> int:
        element = torch.empty((), dtype=dtype).element_size()
        return 2 * config.n_layers * config.n_kv_heads * block_size * config.head_dim * element

    @property
    def scratch_block(self) -> int:
        return self.n_blocks

    @property
    def capacity_tokens(self) -> int:
        return self.n_blocks * self.block_size

    def nbytes(self) -> int:
        """Bytes reserved (virtual on CPU until blocks are first used), scratch block excluded."""
        return 2 * self.k[:, :self.capacity_tokens].numel() * self.k.element_size()

    def prepare(self, blocks: Iterable[int]) -> None:
        """Make sure each of these blocks has been zeroed once (cheap when they have)."""
        fresh = sorted({b for b in blocks if b < self.n_blocks and not self._zeroed[b]})
        if not fresh:
            return
        bs, start = self.block_size, 0
        for i in range(1, len(fresh) + 1):      # runs of consecutive ids: one slice each
            if i == len(fresh) or fresh[i] != fresh[i - 1] + 1:
                lo, hi = fresh[start] * bs, (fresh[i - 1] + 1) * bs
                self.k[:, lo:hi].zero_()
                self.v[:, lo:hi].zero_()
                start = i
        for b in fresh:
            self._zeroed[b] = 1

    def write_and_read(self, layer: int, write_slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       read_blocks: torch.Tensor, read_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k/v [B, Hkv, T, D] at write_slots [B·T], then gather each row's blocks
        read_blocks [B, nb] → keys/values [B, Hkv, read_len, D] (views of one gathered copy)."""
        b, hkv, t, d = k.shape
        ck, cv = self.write(layer, write_slots, k, v)
        if self.decode_rows.active:
            return self.decode_rows.write_and_read(layer, k, v, read_len)
        flat = read_blocks.reshape(-1)
        n = read_blocks.shape[1] * self.block_size
        out = []
        for which, cache in enumerate((ck, cv)):
            # Blocks as flat rows: index_select's 2-D path copies each with one memcpy (alone,
            # 64 rows × 21 blocks: 4.9 ms against 7.6 from the [block, token, head, dim] view).
            rows = cache.view(self.n_blocks + 1, -1)
            buffer = self._gather_buffer(which, flat.numel())
            blocks = torch.index_select(rows, 0, flat, out=None if buffer is None else buffer.view(flat.numel(), -1))
            out.append(blocks.view(b, n, hkv, d)[:, :read_len].transpose(1, 2))
        return out[0], out[1]

    def write(self, layer: int, write_slots: torch.Tensor, k: torch.Tensor,
              v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k/v [B, Hkv, T, D] at write_slots [B·T] → the layer's whole key/value caches."""
        b, hkv, t, d = k.shape
        ck, cv = self.k[layer], self.v[layer]
        ck.index_copy_(0, write_slots, k.transpose(1, 2).reshape(b * t, hkv, d))
        cv.index_copy_(0, write_slots, v.transpose(1, 2).reshape(b * t, hkv, d))
        return ck, cv

    def _gather_buffer(self, which: int, n_blocks: int) -> torch.Tensor | None:
        """On CPU, gathers go into two persistent buffers (keys, values) reused by every layer:
        a fresh multi-MB tensor per layer costs page faults (measured: the gather ~1.5–2×
        slower). Each layer's keys/values are consumed before the next layer gathers. On CUDA
        the caching allocator already reuses memory, and graph capture wants no host-side state."""
        if self.k.device.type != "cpu":
            return None
        buf = self._gathered[which]
        if buf is None or buf.shape[0] < n_blocks:
            buf = self.k.new_empty((n_blocks, self.block_size, *self.k.shape[2:]))   # [n, bs, Hkv, D]
            self._gathered[which] = buf
        return buf[:n_blocks]


def slots_for(block_tables: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    """Token slots of positions [B, T] given block tables [B, nb] → [B, T]."""
    blocks = block_tables.gather(1, positions // block_size)
    return blocks * block_size + positions % block_size


class DecodeRows:
    """Contiguous copies of the decode batch's keys/values, one row per running sequence (CPU).

    Why: a 64-row decode step at context 320 on the default model spent as long gathering every
    row's blocks (a copy of the whole context, every step, every layer) as in attention itself:
    419 ms against 254 ms for the old slot cache's views (252 ms through these rows). Here a sequence's blocks are copied once, when
    it joins the decode batch, and each step appends its new token; attention then reads each
    row's context in place.

    Rows are kept in place while their sequences keep decoding: a sequence that leaves frees its
    row, and the decode batch is ordered by row (`place`), so a departure moves at most one row.
    Memory: one buffer each for keys and values, reserved once at the most the copies may take
    (the pool's own size between them, `PagedKVCache.nbytes`, so the cache's resident memory
    stays within twice its budget; a batch whose copies would not fit reads by gathering
    instead: `place` returns None) and zeroed only as far as rows are used. Rows are laid out
    row-major, [row, layer, width, kv head, dim], so a batch that grows keeps its rows where they
    are: reallocating and refilling every row at each growth (rows 5 → 32 over a burst of
    400-token prompts) had cost 1.1–1.7 s a step, against 9 ms to fill one row. Only a wider
    context (in steps of a quarter) lays the rows out again.
    """

    WIDTH_ALIGN = 64

    def __init__(self, cache: PagedKVCache):
        # A proxy, not a reference: the cache owns these rows, and a cycle between the two would
        # keep both (gigabytes) alive after their engine is gone, until the next gc pass.
        self.cache = weakref.proxy(cache)
        self.k: torch.Tensor | None = None      # [row, layer, width, kv head, head dim] views of
        self.v: torch.Tensor | None = None      # the buffers, as many rows as fit
        self.width = 0
        self._buffers: tuple[torch.Tensor, torch.Tensor] | None = None
        self._zeroed = 0        # leading elements of each buffer zeroed (or since written)
        # Per row: (sequence, its block-table list, tokens held) or None. A sequence that was
        # preempted comes back with a new block-table list, so `is` tells a stale row apart.
        self.owners: list[tuple[object, list[int], int] | None] = []
        self._write_index: torch.Tensor | None = None      # set by place(), per decode forward
        self.active = False

    def place(self, seqs: list, tables: list[list[int]], lengths: list[int]) -> list[int] | None:
        """Make rows 0..B-1 hold the sequences' first `lengths` tokens (copied from their
        blocks `tables` where a row does not hold them already) → `order`: row r holds
        seqs[order[r]], the order in which the decode forward must take them. None when the
        copies would not fit (the caller gathers instead)."""
        b = len(seqs)
        need = _round_up(max(lengths) + 1, self.WIDTH_ALIGN)
        if need > self.width:       # grow by at least a quarter: context grows every step
            wider = max(need, _round_up(self.width * 5 // 4, self.WIDTH_ALIGN))
            width = next((w for w in (wider, need) if self._row_count(w) >= b), None)
            if width is None:
                return None
            self._lay_out(width)
        elif self._row_count(self.width) < b:
            return None
        row_elems = self.k[0].numel()
        self._zero_to(b * row_elems)
        held = {id(o[0]): r for r, o in enumerate(self.owners) if o is not None}
        kept: dict[int, int] = {}       # batch index → row already holding it
        for i, (seq, table, n) in enumerate(zip(seqs, tables, lengths)):
            r = held.get(id(seq))
            if r is not None and self.owners[r][1] is table and self.owners[r][2] == n:
                kept[i] = r
        keep_rows = set(kept.values())
        self.owners = [o if r in keep_rows else None for r, o in enumerate(self.owners)]
        free = [r for r in range(b) if self.owners[r] is None]
        order: list[int | None] = [None] * b
        for i, r in kept.items():
            if r >= b:          # a row past the batch moves into a free one below
                dst = free.pop()
                self._move(r, dst, lengths[i])
                self.owners[dst], self.owners[r] = self.owners[r], None
                r = dst
            order[r] = i
        for i in range(b):
            if i not in kept:
                dst = free.pop()
                self._fill(dst, tables[i], lengths[i])
                order[dst] = i
        for r, i in enumerate(order):   # the forward writes each row's token at its length
            self.owners[r] = (seqs[i], tables[i], lengths[i] + 1)
        # Token slot of each row's new token in layer 0 (a layer adds `width` slots).
        slots_per_row = self.k.shape[1] * self.width
        self._write_index = torch.tensor([r * slots_per_row + lengths[i] for r, i in enumerate(order)])
        return order

    def _row_count(self, width: int) -> int:
        """Rows of this width the buffers hold."""
        c = self.cache
        per_buffer = c.nbytes() // (2 * c.k.element_size())
        return per_buffer // (c.k.shape[0] * width * c.k.shape[2] * c.k.shape[3])

    def _lay_out(self, width: int) -> None:
        """View the buffers with rows of `width` tokens (every row is copied again)."""
        c = self.cache
        if self._buffers is None:       # reserved, untouched: pages become resident as zeroed
            n = c.nbytes() // (2 * c.k.element_size())
            self._buffers = (torch.empty(n, dtype=c.k.dtype), torch.empty(n, dtype=c.k.dtype))
        rows = self._row_count(width)
        shape = (rows, c.k.shape[0], width, *c.k.shape[2:])
        self.k, self.v = (buf[:torch.Size(shape).numel()].view(shape) for buf in self._buffers)
        self.width = width
        self.owners = [None] * rows

    def _zero_to(self, n: int) -> None:
        # A row's positions past its own length are read (masked) and must be finite; memory
        # zeroed once stays finite under any later layout (it only ever receives keys/values).
        if n > self._zeroed:
            for buf in self._buffers:
                buf[self._zeroed:n].zero_()
            self._zeroed = n

    def _move(self, src: int, dst: int, n: int) -> None:
        self.k[dst, :, :n] = self.k[src, :, :n]
        self.v[dst, :, :n] = self.v[src, :, :n]

    def _fill(self, row: int, table: list[int], n: int) -> None:
        c = self.cache
        nb = -(-n // c.block_size)
        if nb == 0:
            return
        index = torch.tensor(table[:nb])
        for pool, copy in ((c.k, self.k), (c.v, self.v)):
            blocks = pool.view(pool.shape[0], c.n_blocks + 1, -1).index_select(1, index)
            copy[row, :, :nb * c.block_size] = blocks.view(pool.shape[0], nb * c.block_size, *pool.shape[2:])

    def write_and_read(self, layer: int, k: torch.Tensor, v: torch.Tensor,
                       read_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Append each row's token k/v [B, Hkv, 1, D] → its keys/values [B, Hkv, read_len, D]."""
        b, hkv, _, d = k.shape
        index = self._write_index + layer * self.width
        out = []
        for new, buf, rows in ((k, self._buffers[0], self.k), (v, self._buffers[1], self.v)):
            buf.view(-1, hkv, d).index_copy_(0, index, new.reshape(b, hkv, d))
            out.append(rows[:b, layer, :read_len].transpose(1, 2))
        return out[0], out[1]

    def attend(self, kernels, layer: int, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               pool_slots: torch.Tensor, lengths: torch.Tensor, n_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The fused decode kernel (model/native_ops.py) for one layer: each row's packed q/k/v
        [B, (H + 2·Hkv)·D] rotated, its k/v appended here and stored in the pool at pool_slots,
        and its attention over its own `lengths` tokens → (output [B, H, D], rotated q [B, H, D])."""
        c = self.cache
        return kernels.decode_attention(qkv, cos, sin, self._buffers[0], self._buffers[1], self._write_index,
                                        layer * self.width, lengths, c.k[layer], c.v[layer], pool_slots,
                                        n_heads, c.k.shape[2])


def _round_up(n: int, step: int) -> int:
    return -(-n // step) * step
