"""Per-request sampling over a batch of logits.

Each request owns a `torch.Generator` seeded from its seed, and its row is sampled from that
row's logits alone, so a seeded request draws the same tokens whatever its batch neighbours are.

Reported logprobs are the log-softmax of the model's raw logits (before repetition penalty,
temperature, top-k and top-p) — what `transformers` reports with `output_logits=True` — so they
measure the model, not the sampling settings.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .types import SamplingParams


class RowSampler:
    """The sampling state of one request: its parameters, generator and token history."""

    def __init__(self, params: SamplingParams, seed: int, prompt_ids: list[int], device: torch.device):
        self.params = params
        self.generator: torch.Generator | None = None
        if not params.greedy:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(seed)
        # Repetition penalty looks at prompt + generated tokens (as transformers does).
        self.seen: set[int] | None = set(prompt_ids) if params.repetition_penalty != 1.0 else None

    @property
    def plain_greedy(self) -> bool:
        return self.params.greedy and self.seen is None

    def record(self, token_id: int) -> None:
        if self.seen is not None:
            self.seen.add(token_id)

    def choose(self, logits: torch.Tensor) -> torch.Tensor:
        """Pick one token from a row of raw logits [V] → 0-dim tensor (stays on the device)."""
        p = self.params
        if self.seen is not None:
            logits = apply_repetition_penalty(logits, self.seen, p.repetition_penalty)
        if p.greedy:
            return logits.argmax()
        logits = logits / p.temperature
        if p.top_k:
            logits = keep_top_k(logits, p.top_k)
        if p.top_p < 1.0:
            logits = keep_top_p(logits, p.top_p)
        probs = torch.softmax(logits, dim=-1)
        return torch.multinomial(probs, 1, generator=self.generator)[0]


def apply_repetition_penalty(logits: torch.Tensor, seen: set[int], penalty: float) -> torch.Tensor:
    """CTRL-style: divide positive logits of seen tokens by the penalty, multiply negative ones."""
    if not seen:
        return logits
    ids = torch.tensor(sorted(seen), device=logits.device)
    picked = logits[ids]
    logits = logits.clone()
    logits[ids] = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits


def keep_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    if k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k).values[-1]
    return logits.masked_fill(logits < kth, float("-inf"))


# Top-p first looks at this many best candidates: almost always they already hold top_p of the
# mass, which spares a sort of the whole vocabulary (the result is the same either way).
_TOP_P_CANDIDATES = 256


def keep_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of best tokens whose probability reaches top_p (at least one)."""
    n = min(_TOP_P_CANDIDATES, logits.shape[-1])
    vals, idx = torch.topk(logits, n)
    probs = torch.softmax(logits, dim=-1)[idx]
    if n < logits.shape[-1] and float(probs.sum()) < top_p:
        vals, idx = torch.sort(logits, descending=True)
        probs = torch.softmax(vals, dim=-1)
    cum = probs.cumsum(-1)
    keep = (cum - probs) < top_p        # a token is kept if the mass before it is below top_p
    keep[0] = True                      # even when top_p underflows float32 to 0
    out = torch.full_like(logits, float("-inf"))
    out[idx[keep]] = vals[keep]
    return out


@dataclass
class SampledRow:
    token_id: int
    logprob: float
    top_logprobs: list[tuple[int, float]]


def sample_batch(logits: torch.Tensor, samplers: list[RowSampler]) -> list[SampledRow]:
    """logits [B, V] (float32, raw) → one token per row, with its raw-logit log-probability."""
    logprobs = torch.log_softmax(logits, dim=-1)
    chosen = logits.argmax(dim=-1)                 # right for plain-greedy rows, overwritten otherwise
    special_rows = [i for i, s in enumerate(samplers) if not s.plain_greedy]
    if special_rows:
        chosen = chosen.clone()
        for i in special_rows:
            chosen[i] = samplers[i].choose(logits[i])
    chosen_lp = logprobs.gather(1, chosen[:, None])[:, 0]
    n_top = max(s.params.top_logprobs for s in samplers)
    top_vals = top_ids = None
    if n_top:
        top_vals, top_ids = torch.topk(logprobs, n_top, dim=-1)
        top_vals, top_ids = top_vals.tolist(), top_ids.tolist()
    out = []
    # One device→host transfer for the whole batch.
    for i, (tok, lp) in enumerate(zip(chosen.tolist(), chosen_lp.tolist())):
        k = samplers[i].params.top_logprobs
        top = list(zip(top_ids[i][:k], top_vals[i][:k])) if k else []
        samplers[i].record(tok)
        out.append(SampledRow(tok, lp, top))
    return out
