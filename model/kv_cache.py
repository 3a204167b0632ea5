"""Paged KV cache: fixed-size blocks of token slots, addressed through per-sequence block tables.

The cache is one preallocated pool of `n_blocks × block_size` token slots per layer; a
sequence owns a list of block ids (its block table) and its token at position p lives in slot
`table[p // block_size] * block_size + p % block_size`. Blocks are handed out and taken back
by the server's scheduler; this module only stores and reads. No allocation per token.

One extra block past the last (`scratch_block`) takes the writes of padding tokens, so a
padded row never writes into a block another sequence owns.

Memory is reserved untouched and each block is zeroed the first time it is used (`prepare`):
resident memory then grows with the blocks actually used, and attention never reads memory
that was never written (a NaN there would leak through the additive mask: 0 · NaN = NaN).
"""

from __future__ import annotations

import torch

BLOCK_SIZE = 16


class PagedKVCache:
    def __init__(self, n_layers: int, n_blocks: int, n_kv_heads: int, head_dim: int,
                 block_size: int = BLOCK_SIZE, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu"):
        if n_blocks < 1:
            raise ValueError("a KV cache needs at least one block")
        self.n_blocks, self.block_size = n_blocks, block_size
        # Layout [layer, kv head, slot, head dim]: a gather of one row's slots yields per-head
        # [L, D] runs, the shape attention wants, without another copy.
        shape = (n_layers, n_kv_heads, (n_blocks + 1) * block_size, head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.k[:, :, n_blocks * block_size:].zero_()        # the scratch block
        self.v[:, :, n_blocks * block_size:].zero_()
        self._zeroed_blocks = 0
        if self.k.device.type != "cpu":     # resident anyway: zero it all now, not mid-step
            self.prepare(n_blocks - 1)

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
        return 2 * self.k[:, :, :self.capacity_tokens].numel() * self.k.element_size()

    def touched_bytes(self) -> int:
        """Bytes of the blocks ever used (what is resident on CPU)."""
        return self.nbytes() * self._zeroed_blocks // self.n_blocks

    def prepare(self, block_id: int) -> None:
        """Make sure every block up to `block_id` has been zeroed once (cheap when it has)."""
        block_id = min(block_id, self.n_blocks - 1)
        if block_id < self._zeroed_blocks:
            return
        bs = self.block_size
        lo, hi = self._zeroed_blocks * bs, (block_id + 1) * bs
        self.k[:, :, lo:hi].zero_()
        self.v[:, :, lo:hi].zero_()
        self._zeroed_blocks = block_id + 1

    def write_and_read(self, layer: int, write_slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       read_blocks: torch.Tensor, read_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k/v [B, Hkv, T, D] at write_slots [B·T], then gather each row's blocks
        read_blocks [B, nb] → keys/values [B, Hkv, read_len, D] (views of one gathered copy).
        Whole blocks are gathered, not token slots: on CPU that copy runs ~2× faster."""
        b, hkv, t, d = k.shape
        ck, cv = self.k[layer], self.v[layer]
        ck.index_copy_(1, write_slots, k.transpose(0, 1).reshape(hkv, b * t, d))
        cv.index_copy_(1, write_slots, v.transpose(0, 1).reshape(hkv, b * t, d))
        flat = read_blocks.reshape(-1)
        n = read_blocks.shape[1] * self.block_size
        out = []
        for cache in (ck, cv):
            # Advanced indexing: 1.6× faster than index_select along dim 1 on CPU.
            blocks = cache.view(hkv, -1, self.block_size, d)[:, flat]
            out.append(blocks.view(hkv, b, n, d).transpose(0, 1)[:, :, :read_len])
        return out[0], out[1]


def slots_for(block_tables: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    """Token slots of positions [B, T] given block tables [B, nb] → [B, T]."""
    blocks = block_tables.gather(1, positions // block_size)
    return blocks * block_size + positions % block_size
