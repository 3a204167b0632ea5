"""LLaMA decoder (RMSNorm, RoPE, GQA, SwiGLU) with the LLaMA-Adapter branch in attention.

The model knows nothing of requests: it takes token ids, their positions, optional paged-cache
block tables and optional per-sequence adapter inputs. Parameter names follow Meta's checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from . import native_ops
from .adapter import AdapterBatch, adapter_attention
from .batch_adapters import BatchAdapters, LayerAdapters
from .config import ModelConfig
from .kv_cache import PagedKVCache, slots_for
from .lora import LoraLayer
from .packed_linear import Int4Weight, PackedLinear, pack_linear, packing_available
from .rope import apply_rope, rope_table


# Packs the named linear weights of one module (e.g. "wq", "wk", "wv") as one PackedLinear.
PackLinear = Callable[..., PackedLinear]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.kernels: ModuleType | None = None      # model/native_ops.py, once packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernels is not None:        # one pass, not F.rms_norm's seven kernels
            return self.kernels.rms_norm(x, self.weight, self.eps)
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.wqkv: PackedLinear | None = None    # replaces wq/wk/wv once packed for CPU inference
        self.fused_adapter_attention = False     # model/adapter.py adapter_attention(fused=…)
        self.kernels: ModuleType | None = None   # model/native_ops.py, once packed

    def pack(self, linear: "PackLinear") -> None:
        self.wqkv = linear("wq", "wk", "wv")
        self.wo = linear("wo")
        del self.wq, self.wk, self.wv

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.wqkv is not None:
            return self.wqkv(x)
        return self.wq(x), self.wk(x), self.wv(x)

    def project_kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The frozen key/value projections (what LLaMA-Adapter applies to its prompts)."""
        if self.wqkv is not None:
            return self.wqkv(x)[1:]
        return self.wk(x), self.wv(x)

    def rotated_qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    lora: LoraLayer | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, T, dim] → q [B, H, T, D] and k [B, Hkv, T, D] with RoPE applied, v [B, Hkv, T, D]."""
        b, t, _ = x.shape
        h, hkv, d = self.n_heads, self.n_kv_heads, self.head_dim
        if self.wqkv is not None and lora is None:
            # q and k are adjacent heads of the one packed product: one RoPE over both (decode is
            # launch-bound), element for element the same arithmetic as rotating each apart.
            qkv = self.wqkv.product(x).float().view(b, t, h + 2 * hkv, d).transpose(1, 2)   # K/V cache: fp32
            qk = apply_rope(qkv[:, :h + hkv], cos, sin)
            return qk[:, :h], qk[:, h:], qkv[:, h + hkv:]
        q, k, v = self.project_qkv(x)
        if lora is not None:     # each row's LoRA delta on the split q/k/v outputs
            q, k, v = lora.add(("q", "k", "v"), x, (q, k, v))
        q = q.view(b, t, h, d).transpose(1, 2)
        k = k.view(b, t, hkv, d).transpose(1, 2)
        v = v.view(b, t, hkv, d).transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: "_StepContext",
                adapter: LayerAdapters | None) -> torch.Tensor:
        b, t, _ = x.shape
        lora = adapter.lora if adapter is not None else None
        prefix = adapter.prefix if adapter is not None else None
        if ctx.rope_rows is not None and self.kernels is not None and lora is None and prefix is None:
            # One token per row, read from the decode rows: RoPE, both KV writes and attention
            # in one kernel (a batch-1 step of the default model: ~11 kernels a layer fewer).
            out, q = ctx.cache.decode_rows.attend(self.kernels, self.layer_idx, self.wqkv.product(x).reshape(b, -1),
                                                  *ctx.rope_rows, ctx.write_slots, ctx.lengths, self.n_heads)
            return self._output(out.view(b, self.n_heads, 1, self.head_dim), q.view(b, self.n_heads, 1, self.head_dim),
                                adapter, lora)
        q, k, v = self.rotated_qkv(x, cos, sin, lora)
        if ctx.own_keys_only:       # a first prompt chunk: its own keys are all it reads
            ctx.cache.write(self.layer_idx, ctx.write_slots, k, v)
            # In the dtype wo rounds its input to anyway (q/k/v come out of wqkv in it): SDPA's
            # CPU kernel runs ~2.5× faster in bf16 than in fp32 (1 × 512 tokens: 8.2 → 2.9 ms).
            dt = self.wo.dtype if isinstance(self.wo, PackedLinear) else q.dtype
            out = F.scaled_dot_product_attention(q.to(dt), k.to(dt), v.to(dt), is_causal=True,
                                                 enable_gqa=True).to(q.dtype)
        elif ctx.cache is None and prefix is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=t > 1, enable_gqa=True)
        elif ctx.cache is None:
            keys, values = prefix.prepend(self.layer_idx, k, v)
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=ctx.mask, enable_gqa=True)
        else:
            keys, values = ctx.cache.write_and_read(self.layer_idx, ctx.write_slots, k, v, ctx.read_blocks,
                                                    ctx.read_len)
            if prefix is not None:
                keys, values = prefix.prepend(self.layer_idx, keys, values)
            # Query heads that share a KV head are folded into the query axis (ctx.mask repeats
            # per head): one product per KV head, no expanded copy of the cached keys/values.
            folded = q.reshape(b, self.n_kv_heads, -1, self.head_dim)
            out = F.scaled_dot_product_attention(folded, keys, values, attn_mask=ctx.mask)
            out = out.view(b, self.n_heads, t, self.head_dim)
        return self._output(out, q, adapter, lora)

    def _output(self, out: torch.Tensor, q: torch.Tensor, adapter: LayerAdapters | None,
                lora: LoraLayer | None) -> torch.Tensor:
        """Attention output [B, H, T, D] (rotated queries q alike) → the layer's output, with
        the gated adapter branches and wo."""
        b, _, t, _ = out.shape
        for gated in adapter.gated if adapter is not None else ():
            out = out + adapter_attention(q, gated, self.fused_adapter_attention, self.kernels)
        out = out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim)
        if lora is not None:
            return lora.add(("o",), out, (self.wo(out),))[0]
        # Packed: in the kernel's dtype; the caller's residual add widens it to float32 exactly.
        return self.wo.native(out) if isinstance(self.wo, PackedLinear) else self.wo(out)


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)   # gate
        self.w2 = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)   # down
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)   # up
        self.w13: PackedLinear | None = None     # replaces w1/w3 once packed for CPU inference
        self.kernels: ModuleType | None = None   # model/native_ops.py, once packed

    def pack(self, linear: "PackLinear") -> None:
        self.w13 = linear("w1", "w3")
        self.w2 = linear("w2")
        del self.w1, self.w3

    def forward(self, x: torch.Tensor, adapter: LayerAdapters | None = None) -> torch.Tensor:
        lora = adapter.lora if adapter is not None else None
        if lora is None and self.w13 is None:
            return self.w2(F.silu(self.w1(x)) * self.w3(x))
        if lora is None:
            # Packed: gate/up stay in the kernel's dtype (bf16), as silu(gate)·up is w2's input,
            # rounded to it anyway: no float32 round trip of [T, 2·ffn_dim]; w2's output too (the
            # caller's residual add widens it to float32 exactly).
            if self.kernels is not None:    # silu(gate)·up in one pass, rounded once
                return self.w2.native(self.kernels.silu_mul(self.w13.product(x), self.w13.split_sizes[0]))
            gate, up = self.w13.native(x)
            return self.w2.native(F.silu(gate) * up)
        gate, up = self.w13(x) if self.w13 is not None else (self.w1(x), self.w3(x))
        gate, up = lora.add(("gate", "up"), x, (gate, up))
        h = F.silu(gate) * up
        return lora.add(("down",), h, (self.w2(h),))[0]


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.attention = Attention(cfg, layer_idx)
        self.feed_forward = FeedForward(cfg)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, x, cos, sin, ctx, adapter):
        # Attention and feed-forward may return their packed kernels' dtype: x + y widens it.
        h = x + self.attention(self.attention_norm(x), cos, sin, ctx, adapter)
        return h + self.feed_forward(self.ffn_norm(h), adapter)


class _StepContext:
    """Per-forward cache addressing shared by all layers (computed once, not per layer)."""

    def __init__(self, cache: PagedKVCache | None, block_tables: torch.Tensor | None,
                 positions: torch.Tensor, heads_per_kv: int, read_len: int | None,
                 adapters: BatchAdapters | None, dtype: torch.dtype, cos: torch.Tensor, sin: torch.Tensor):
        self.cache = cache
        self.write_slots = self.read_blocks = self.mask = None
        self.read_len = 0
        self.own_keys_only = False
        # A decode step over the cache's decode rows: what the fused kernel takes (Attention).
        self.rope_rows: tuple[torch.Tensor, torch.Tensor] | None = None
        self.lengths: torch.Tensor | None = None
        if cache is not None and cache.decode_rows.active and positions.shape[1] == 1:
            b = positions.shape[0]
            self.rope_rows, self.lengths = (cos.reshape(b, -1), sin.reshape(b, -1)), positions.reshape(-1) + 1
        prefix = adapters.prefix if adapters is not None else None
        if cache is not None:
            if block_tables is None:
                raise ValueError("a KV cache needs the block table of every sequence")
            bs = cache.block_size
            self.write_slots = slots_for(block_tables, positions, bs).reshape(-1)
            # Each row reads its positions 0..read_len-1 from the blocks that hold them (entries past
            # its own blocks name the scratch block; masked). A fixed read_len keeps the step free of
            # host synchronisation (CUDA graphs).
            if read_len is None:
                read_len = int(positions.max()) + 1
                # A chunk that starts every row at position 0 (prompts' first chunks, padding after
                # them) reads only its own new keys: causal attention over them, with no gather
                # from the cache and no mask (SDPA at 4 × 512 tokens: 107 → 64 ms per layer).
                # Asked only here, where the step synchronises anyway.
                self.own_keys_only = (prefix is None and positions.shape[1] > 1
                                      and not bool(positions[:, 0].any()))
            self.read_len = read_len
        if cache is not None and not self.own_keys_only:
            self.read_blocks = block_tables[:, :-(-read_len // bs)]
            key_pos = torch.arange(read_len, device=positions.device)
            visible = key_pos[None, None, None, :] <= positions[:, None, :, None]     # [B,1,T,L]
            # Additive (SDPA's CPU kernel runs faster on it than on a bool mask), repeated for
            # the query heads folded onto each KV head: [B, 1, heads_per_kv·T, L].
            zeros = torch.zeros(visible.shape, dtype=cache.k.dtype, device=positions.device)
            self.mask = zeros.masked_fill(~visible, float("-inf")).repeat(1, 1, heads_per_kv, 1)
        if prefix is not None:    # one joint softmax over [prefix; tokens]
            if self.mask is None:
                t = positions.shape[1]
                causal = torch.ones(t, t, dtype=torch.bool, device=positions.device).tril()
                self.mask = torch.zeros(causal.shape, dtype=dtype, device=positions.device).masked_fill(
                    ~causal, float("-inf")).expand(positions.shape[0], 1, t, t)
            self.mask = prefix.joint_mask(self.mask)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(TransformerBlock(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        cos, sin = rope_table(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, cfg.rope_scaling)
        # Explicit device: the loaders build the model under torch.device("meta").
        self.register_buffer("rope_cos", cos.to("cpu"), persistent=False)
        self.register_buffer("rope_sin", sin.to("cpu"), persistent=False)

    @property
    def packed(self) -> bool:
        return isinstance(self.output, PackedLinear)

    def pack_for_cpu_inference(self, mode: str = "fp32", quantized: dict[str, Int4Weight] | None = None,
                               fused_kernels: bool = True) -> bool:
        """Swap every linear layer for its packed form in weight mode `mode`
        (model/packed_linear.py); the loader does this once, for inference (model/loading.py).

        `quantized`: weights the checkpoint holds as 4-bit codes (GGUF mode), by parameter name;
        their dense parameters were never materialised. Inference only and one way: afterwards
        the model has no autograd through its linears and no dense linear weights (their packed
        copies replace them, so memory does not double; a tied head costs one extra copy, the
        embedding stays dense float32). Returns whether the model is packed; a model that cannot
        be (not float32 on a oneDNN CPU) is left as it is.

        `fused_kernels`: in every mode but fp32 (the reference arithmetic), run RMSNorm,
        silu·up, the decode rows' attention and the gated adapter branch through
        model/native_ops.py where it builds.
        """
        if self.packed:
            raise ValueError("this model is already packed")
        if not packing_available(self.tok_embeddings.weight):
            return False
        quantized = quantized or {}

        def packer(prefix: str) -> PackLinear:
            def linear(*names: str) -> PackedLinear:
                full = [f"{prefix}.{n}.weight" for n in names]
                return pack_linear([quantized.get(n) or self.get_parameter(n) for n in full], mode)
            return linear

        kernels = native_ops.load() if fused_kernels and mode != "fp32" else None
        self.norm.kernels = kernels
        for i, layer in enumerate(self.layers):
            layer.attention_norm.kernels = layer.ffn_norm.kernels = kernels
            layer.attention.kernels = layer.feed_forward.kernels = kernels
            layer.attention.pack(packer(f"layers.{i}.attention"))
            # fp32 stays the reference arithmetic; the other modes already round far more.
            layer.attention.fused_adapter_attention = mode != "fp32"
            layer.feed_forward.pack(packer(f"layers.{i}.feed_forward"))
        # A 4-bit output head costs most of int4's accuracy (on the default model, top-1 agreement
        # with fp32 0.83 with it against 0.97 with an int8 head): it stays int8.
        head_mode = "int8" if mode == "int4" else mode
        self.output = pack_linear([quantized.get("output.weight") or self.output.weight], head_mode)
        # What stays dense (embedding, norms) may be views of the checkpoint's memory map, which
        # would keep every page the packing read resident: own copies let the map go.
        for p in self.parameters():
            p.data = p.data.clone()
        return True

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                cache: PagedKVCache | None = None, block_tables: torch.Tensor | None = None,
                adapters: AdapterBatch | BatchAdapters | None = None,
                logits_index: torch.Tensor | None = None, read_len: int | None = None) -> torch.Tensor:
        """tokens/positions [B, T] → logits [B, T, V], or [B, V] at `logits_index` [B] if given.

        With a cache, each row's new k/v are stored at its positions through its block table
        (block_tables [B, nb], wide enough for every position; entries past a row's own blocks
        name the cache's scratch block) and the row attends to its positions ≤ its own. Padding
        rows/tokens are allowed if their positions stay inside the table; their outputs are
        meaningless and must be ignored.
        """
        x = self.run_layers(self.tok_embeddings(tokens), positions, cache, block_tables, adapters,
                            read_len=read_len)
        if logits_index is not None:
            x = x[torch.arange(x.shape[0], device=x.device), logits_index]
        return self.head(x)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Final hidden states [..., dim] → float32 logits [..., V]."""
        return self.output(self.norm(x)).float()

    def run_layers(self, x: torch.Tensor, positions: torch.Tensor | None = None,
                   cache: PagedKVCache | None = None, block_tables: torch.Tensor | None = None,
                   adapters: AdapterBatch | BatchAdapters | None = None,
                   layers: range | None = None, read_len: int | None = None) -> torch.Tensor:
        """Hidden states x [B, T, dim] through `layers` (default: all) → [B, T, dim], before the
        final norm. Training runs sub-ranges: the frozen layers below the first adapted one once
        per example, without autograd, and the output head only at target positions."""
        b, t, _ = x.shape
        if positions is None:
            positions = torch.arange(t, device=x.device).expand(b, t)
        adapters = BatchAdapters.of(adapters)
        dtype = self.tok_embeddings.weight.dtype
        shift = adapters.position_offsets if adapters is not None else None
        # A shifted row's padding positions may run past the table (real ones never do: the engine
        # refuses requests whose prefix + length exceed it); padding outputs are discarded.
        rope_pos = positions if shift is None else (positions + shift[:, None]).clamp(max=self.rope_cos.shape[0] - 1)
        cos = self.rope_cos[rope_pos].to(dtype).unsqueeze(1)    # [B, 1, T, D]
        sin = self.rope_sin[rope_pos].to(dtype).unsqueeze(1)
        ctx = _StepContext(cache, block_tables, positions, self.config.n_heads // self.config.n_kv_heads,
                           read_len, adapters, dtype, cos, sin)
        for i in layers if layers is not None else range(len(self.layers)):
            x = self.layers[i](x, cos, sin, ctx, adapters.layer(i) if adapters is not None else None)
        return x
