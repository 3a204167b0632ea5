"""The model runner: the only engine code that builds tensors.

It owns the paged KV cache and turns a step's plan (scheduler `Sequence`s: their tokens,
positions and block tables, plus each row's adapters with their weights) into the model's inputs, runs the
decode forward and the prefill forward, and returns logits.

Inputs are written into persistent host buffers (pinned on CUDA, copied without blocking).
On CUDA the decode step is also captured as CUDA graphs, one per (batch size, context length,
adapter length) bucket, replayed with its static inputs refilled: no per-step allocation and
no host synchronisation inside the step (attention reads a bucket's fixed context length,
masked, instead of asking the device for the longest position).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from model.adapter import AdapterBatch, AdapterRows, LayerAdapterInputs
from model.batch_adapters import BatchAdapters, RowAdapters
from model.kv_cache import PagedKVCache

from .scheduler import Sequence

log = logging.getLogger(__name__)

# Decode batches are padded up to one of these row counts when CUDA graphs are on.
GRAPH_BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


@dataclass
class PromptLogprobs:
    """Log-probabilities of prompt tokens computed in a prefill chunk."""

    positions: list[int]                         # prompt positions (≥ 1) they belong to
    logprobs: list[float]
    top: list[list[tuple[int, float]]]


def _bucket(n: int, sizes: tuple[int, ...]) -> int | None:
    return next((s for s in sizes if s >= n), None)


class ModelRunner:
    def __init__(self, model, n_blocks: int, block_size: int, max_batch: int, max_seq_len: int,
                 compile: bool = False, cuda_graphs: bool = False):
        self.model = model
        self.n_layers = model.config.n_layers
        weight = model.tok_embeddings.weight
        self.device, self.dtype = weight.device, weight.dtype
        self.cache = PagedKVCache.for_model(model, n_blocks, block_size)
        self.block_size = block_size
        self.max_seq_len = max_seq_len
        self.table_width = -(-max_seq_len // block_size)
        self._decode_model = torch.compile(model, dynamic=True) if compile else model
        self._adapter_key: tuple = ()
        self._adapter_batch: BatchAdapters | None = None
        on_cuda = self.device.type == "cuda"
        # Persistent host-side input buffers; pinned on CUDA so the copies do not block.
        rows = max(max_batch, _bucket(max_batch, GRAPH_BATCH_SIZES) or max_batch)
        self._host_tokens = torch.zeros(rows, dtype=torch.long, pin_memory=on_cuda)
        self._host_positions = torch.zeros(rows, dtype=torch.long, pin_memory=on_cuda)
        self._host_tables = torch.zeros(rows, self.table_width, dtype=torch.long, pin_memory=on_cuda)
        self.graphs = _DecodeGraphs(self.table_width * block_size) if cuda_graphs and on_cuda else None

    # ---- decode ---------------------------------------------------------------------------
    def decode(self, rows: list[Sequence], adapters: list[RowAdapters]) -> tuple[list[Sequence], torch.Tensor]:
        """One token per row (its last token, at position n_cached) → (the rows in the order the
        step ran them, their logits [B, V]). On CPU that order is the one of the cache's decode
        rows (model/kv_cache.py DecodeRows), which keeps each running sequence's keys/values
        contiguous; elsewhere, or when those copies do not fit, it is the given order."""
        order = None
        if self.device.type == "cpu":
            order = self.cache.decode_rows.place(rows, [s.block_table for s in rows], [s.n_cached for s in rows])
            if order is not None:
                rows, adapters = [rows[i] for i in order], [adapters[i] for i in order]
        return rows, self._decode(rows, adapters, order is not None)

    def _decode(self, rows: list[Sequence], adapters: list[RowAdapters], read_rows: bool) -> torch.Tensor:
        b = len(rows)
        read_len = max(s.n_cached for s in rows) + 1
        width = -(-read_len // self.block_size)
        scratch = self.cache.scratch_block
        toks, pos, tables = self._host_tokens, self._host_positions, self._host_tables
        toks[:b] = torch.tensor([s.token_ids[s.n_cached] for s in rows])
        pos[:b] = torch.tensor([s.n_cached for s in rows])
        tables[:b, :width] = torch.tensor([s.block_table[:width] + [scratch] * (width - len(s.block_table[:width]))
                                           for s in rows])
        tables[:b, width:] = scratch       # a CUDA graph reads its bucket's whole width
        # Only a row's last block can be new to the cache: the others were its prompt's (prepared
        # by the prefill) or were the last block of an earlier step.
        self.cache.prepare(s.block_table[-1] for s in rows)
        batch = self._decode_adapters(adapters)
        if self.graphs is not None:
            try:
                logits = self.graphs.run(self, b, read_len, batch)
            except Exception:       # a capture this build cannot do: eager from now on
                log.exception("CUDA graph capture/replay failed; decoding eagerly from now on")
                self.graphs = None
                logits = None
            if logits is not None:
                return logits
        dev = self.device
        tokens = toks[:b].to(dev, non_blocking=True)[:, None]
        positions = pos[:b].to(dev, non_blocking=True)[:, None]
        block_tables = tables[:b, :width].to(dev, non_blocking=True)
        self.cache.decode_rows.active = read_rows
        try:
            return self._decode_model(tokens, positions, self.cache, block_tables, batch,
                                      read_len=read_len)[:, 0]
        finally:
            self.cache.decode_rows.active = False

    def _decode_adapters(self, rows: list[RowAdapters]) -> BatchAdapters | None:
        # The decode batch changes only when requests join or leave (a lease's parts tuple is
        # one object for its lifetime): reuse the stacked adapters.
        key = tuple(rows)
        if len(key) != len(self._adapter_key) or any(a is not b for a, b in zip(key, self._adapter_key)):
            self._adapter_batch = BatchAdapters.build(list(rows), self.n_layers)
            self._adapter_key = key
        return self._adapter_batch

    # ---- prefill --------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, chunks: list[tuple[Sequence, int]], adapters: list[RowAdapters],
                prompt_logprobs: dict[int, int]) -> tuple[torch.Tensor, dict[int, PromptLogprobs]]:
        """Prompt chunks padded to the longest → logits [B, V] at each row's last chunk token,
        and, for the rows named in prompt_logprobs (row → alternatives wanted), the
        log-probabilities of the prompt tokens that chunk predicts."""
        bs, scratch = self.block_size, self.cache.scratch_block
        width = max(n for _, n in chunks)
        last_pos = self.max_seq_len - 1
        tokens, positions = [], []
        for seq, n in chunks:
            start, pad = seq.n_cached, width - n
            tokens.append(seq.token_ids[start:start + n] + [0] * pad)
            # Padding goes to positions after the chunk: the row never reads them before its
            # own later tokens overwrite them (a row reads only positions ≤ its own), and past
            # its blocks they land in the scratch block.
            positions.append(list(range(start, start + n)) + [min(start + n + j, last_pos) for j in range(pad)])
        n_table = -(-(max(p[-1] for p in positions) + 1) // bs)
        tables = [s.block_table[:n_table] + [scratch] * (n_table - len(s.block_table[:n_table]))
                  for s, _ in chunks]
        self.cache.prepare(b for s, _ in chunks for b in s.block_table)
        dev = self.device
        pos_t = torch.tensor(positions, device=dev)
        hidden = self.model.run_layers(
            self.model.tok_embeddings(torch.tensor(tokens, device=dev)), pos_t, self.cache,
            torch.tensor(tables, device=dev), BatchAdapters.build(adapters, self.n_layers))
        last = torch.tensor([n - 1 for _, n in chunks], device=dev)
        logits = self.model.head(hidden[torch.arange(len(chunks), device=dev), last])
        return logits, {i: self._prompt_logprobs(hidden[i], *chunks[i], n_top)
                        for i, n_top in prompt_logprobs.items()}

    def _prompt_logprobs(self, hidden: torch.Tensor, seq: Sequence, n: int, n_top: int) -> PromptLogprobs:
        """A chunk at positions start..start+n-1 predicts the prompt tokens after each."""
        start = seq.n_cached
        m = min(start + n, seq.n_prompt - 1) - start      # predicted tokens that are prompt tokens
        if m <= 0:
            return PromptLogprobs([], [], [])
        lp = torch.log_softmax(self.model.head(hidden[:m]), dim=-1)
        targets = torch.tensor(seq.token_ids[start + 1:start + 1 + m], device=lp.device)
        chosen = lp.gather(1, targets[:, None])[:, 0].tolist()
        top: list[list[tuple[int, float]]] = [[] for _ in range(m)]
        if n_top:
            vals, ids = torch.topk(lp, n_top, dim=-1)
            top = [list(zip(i, v)) for i, v in zip(ids.tolist(), vals.tolist())]
        return PromptLogprobs(list(range(start + 1, start + 1 + m)), chosen, top)


class _DecodeGraphs:
    """CUDA graphs of the decode step, captured lazily per (rows, context, adapter length)
    bucket. Every row gets adapter inputs in every layer (zero gates for base rows and
    unadapted layers), so one graph serves any mix of adapters up to its adapter length."""

    def __init__(self, max_context: int):
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple[int, int, int], tuple[torch.cuda.CUDAGraph, dict, torch.Tensor]] = {}
        self.context_sizes = tuple(sorted({min(max_context, 1 << k) for k in range(6, 20)}))
        self.adapter_sizes = (0, 8, 16, 32, 64, 128)
        self.stream = torch.cuda.Stream()

    def run(self, r: ModelRunner, b: int, read_len: int, adapters: BatchAdapters | None) -> torch.Tensor | None:
        """Replay the bucket's graph → logits [b, V], or None when no bucket fits. Graphs
        cover the base model and one LLaMA-Adapter per row; LoRA, prefix tuning and composed
        prompts decode eagerly."""
        if adapters is not None and (adapters.lora is not None or adapters.prefix is not None
                                     or len(adapters.gated) > 1):
            return None
        batch = adapters.gated[0] if adapters is not None and adapters.gated else None
        rows = _bucket(b, GRAPH_BATCH_SIZES)
        context = _bucket(read_len, self.context_sizes)
        k_len = 0 if batch is None else max(g.keys.shape[2] for a in batch.per_layer.values() for g in a.groups)
        k_bucket = _bucket(k_len, self.adapter_sizes)
        if rows is None or context is None or k_bucket is None:
            return None
        key = (rows, context, k_bucket)
        if key not in self.graphs:
            self.graphs[key] = self._capture(r, rows, context, k_bucket)
        graph, static, out = self.graphs[key]
        width = context // r.block_size
        static["tokens"][:b, 0].copy_(r._host_tokens[:b], non_blocking=True)
        static["positions"][:b, 0].copy_(r._host_positions[:b], non_blocking=True)
        static["tables"][:b].copy_(r._host_tables[:b, :width], non_blocking=True)
        static["tables"][b:].fill_(r.cache.scratch_block)
        static["positions"][b:].zero_()
        self._fill_adapters(static, b, batch)
        graph.replay()
        return out[:b]

    def _capture(self, r: ModelRunner, rows: int, context: int, k_len: int):
        dev, cfg = r.device, r.model.config
        width = context // r.block_size
        static = {"tokens": torch.zeros(rows, 1, dtype=torch.long, device=dev),
                  "positions": torch.zeros(rows, 1, dtype=torch.long, device=dev),
                  "tables": torch.full((rows, width), r.cache.scratch_block, dtype=torch.long, device=dev)}
        batch = None
        if k_len:
            shape = (cfg.n_layers, rows, cfg.n_kv_heads, k_len, cfg.head_dim)
            static["keys"] = torch.zeros(shape, dtype=r.dtype, device=dev)
            static["values"] = torch.zeros(shape, dtype=r.dtype, device=dev)
            static["gates"] = torch.zeros(cfg.n_layers, rows, cfg.n_heads, 1, 1, dtype=r.dtype, device=dev)
            static["key_mask"] = torch.ones(cfg.n_layers, rows, k_len, dtype=torch.bool, device=dev)
            batch = AdapterBatch({i: LayerAdapterInputs([AdapterRows(
                static["keys"][i], static["values"][i], static["gates"][i], static["key_mask"][i], None)])
                for i in range(cfg.n_layers)})

        def step():
            return r.model(static["tokens"], static["positions"], r.cache, static["tables"], batch,
                           read_len=context)[:, 0]

        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            step()                      # warm-up outside the graph (allocator, kernels)
        torch.cuda.current_stream().wait_stream(self.stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = step()
        return graph, static, out

    @staticmethod
    def _fill_adapters(static: dict, b: int, batch: AdapterBatch | None) -> None:
        if "keys" not in static:
            return
        static["gates"].zero_()
        static["keys"].zero_()
        static["values"].zero_()
        static["key_mask"].fill_(True)
        if batch is None:
            return
        for i, a in batch.per_layer.items():
            for g in a.groups:
                rows = g.rows if g.rows is not None else torch.arange(b, device=g.keys.device)
                k = g.keys.shape[2]
                static["keys"][i, rows, :, :k] = g.keys
                static["values"][i, rows, :, :k] = g.values
                static["gates"][i, rows] = g.gates
                # Keys past a group's own length stay zero and are masked out; a row in no group
                # keeps a zero gate (its all-visible zero keys then add nothing).
                mask = torch.zeros(len(rows), static["key_mask"].shape[2], dtype=torch.bool, device=g.keys.device)
                mask[:, :k] = True if g.key_mask is None else g.key_mask
                static["key_mask"][i, rows] = mask
