"""Per-request sampling over a batch of logits.

Every row has its own parameters; the rows that sample draw in one batched pass (temperature,
top-k, top-p, inverse-CDF draw), each with one uniform from its own `torch.Generator`, so a
seeded request draws the same tokens whatever its batch neighbours are. Before choosing, a row's
logits get its repetition penalty, its `logit_bias` and its grammar mask (greedy rows too).

Reported logprobs are the log-softmax of the model's raw logits (before repetition penalty,
logit bias, grammar, temperature, top-k and top-p) — what `transformers` reports with
`output_logits=True` — so they measure the model, not the sampling settings.

A row whose preparation fails (its grammar rejects a token, ...) gets the Exception instead of
a token; the engine fails that request alone.

On CUDA nothing here waits for the device until the batch's results are read, once, in one
transfer: host values go up through pinned memory without blocking (`_to_device`; a plain
`torch.tensor(..., device="cuda")` synchronises the stream), and no branch depends on a device
value.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .grammar import GrammarMatcher, allowed_tokens
from .types import SamplingParams


class RowSampler:
    """The sampling state of one request: parameters, generator, token history, grammar."""

    def __init__(self, params: SamplingParams, seed: int, prompt_ids: list[int], device: torch.device,
                 grammar: GrammarMatcher | None = None):
        self.params = params
        self.generator: torch.Generator | None = None
        if not params.greedy:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(seed)
        # Repetition penalty looks at prompt + generated tokens (as transformers does).
        self.seen: set[int] | None = set(prompt_ids) if params.repetition_penalty != 1.0 else None
        self.bias: tuple[torch.Tensor, torch.Tensor] | None = None
        if params.logit_bias:
            ids = sorted(params.logit_bias)
            self.bias = (torch.tensor(ids, device=device),
                         torch.tensor([float(params.logit_bias[i]) for i in ids], device=device))
        self.grammar = grammar
        self.done = False               # the grammar is complete: nothing may follow

    @property
    def plain_greedy(self) -> bool:
        return self.params.greedy and self.seen is None and self.bias is None and self.grammar is None

    def adjust(self, logits: torch.Tensor) -> torch.Tensor:
        """Repetition penalty and logit bias on one row of logits [V] (the grammar mask comes
        batched, in sample_batch)."""
        if self.seen is not None:
            logits = apply_repetition_penalty(logits, self.seen, self.params.repetition_penalty)
        if self.bias is not None:
            ids, values = self.bias
            logits = logits.index_add(0, ids, values.to(logits.dtype))
        return logits

    def record(self, token_id: int) -> None:
        if self.seen is not None:
            self.seen.add(token_id)
        if self.grammar is not None:
            self.done = self.grammar.consume(token_id)


def apply_repetition_penalty(logits: torch.Tensor, seen: set[int], penalty: float) -> torch.Tensor:
    """CTRL-style: divide positive logits of seen tokens by the penalty, multiply negative ones."""
    if not seen:
        return logits
    ids = _to_device(sorted(seen), logits.device)
    picked = logits[ids]
    logits = logits.clone()
    logits[ids] = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits


def keep_top_k(logits: torch.Tensor, k: torch.Tensor, kmax: int | None = None) -> torch.Tensor:
    """logits [B, V], k [B] (0 = off) → logits with all but each row's k best at -inf.
    `kmax`: the largest k when the caller knows it (reading it from k waits for the device)."""
    k = k.clamp(max=logits.shape[-1])
    kmax = int(k.max()) if kmax is None else min(kmax, logits.shape[-1])
    if kmax == 0:
        return logits
    top = torch.topk(logits, kmax, dim=-1).values
    kth = top.gather(1, (k - 1).clamp(min=0)[:, None])
    kth = torch.where(k[:, None] > 0, kth, torch.full_like(kth, float("-inf")))
    return logits.masked_fill(logits < kth, float("-inf"))


# Top-p first looks at this many best candidates: almost always they already hold top_p of the
# mass, which spares a sort of the whole vocabulary (the result is the same either way).
_TOP_P_CANDIDATES = 256


def keep_top_p(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """probs [B, V], top_p [B] → probs keeping, per row, the smallest set of best tokens whose
    probability reaches top_p (at least one); the others are 0 (not renormalised)."""
    n = min(_TOP_P_CANDIDATES, probs.shape[-1])
    if probs.is_cuda:       # a full sort costs a GPU little; the shortcut's test would wait for it
        vals, idx = torch.sort(probs, dim=-1, descending=True)
    else:
        vals, idx = torch.topk(probs, n, dim=-1)
        if n < probs.shape[-1] and bool((vals.sum(-1) < top_p).any()):
            vals, idx = torch.sort(probs, dim=-1, descending=True)
    cum = vals.cumsum(-1)
    keep = (cum - vals) < top_p[:, None]   # a token is kept if the mass before it is below top_p
    keep[:, 0] = True                      # even when top_p underflows float32 to 0
    return torch.zeros_like(probs).scatter_(1, idx, torch.where(keep, vals, torch.zeros_like(vals)))


def sample_rows(logits: torch.Tensor, params: list[SamplingParams], uniforms: torch.Tensor) -> torch.Tensor:
    """Batched sampling: logits [B, V] (already adjusted), one parameter set and one uniform in
    [0, 1) per row → token ids [B]. The draw inverts each row's CDF at its uniform."""
    dev = logits.device
    temperature = _to_device([p.temperature for p in params], dev, logits.dtype)
    logits = logits / temperature[:, None]
    if any(p.top_k for p in params):
        # A top_k past the vocabulary keeps everything (and must not overflow the index type).
        ks = [min(p.top_k, logits.shape[-1]) for p in params]
        logits = keep_top_k(logits, _to_device(ks, dev), max(ks))
    probs = torch.softmax(logits, dim=-1)
    if any(p.top_p < 1.0 for p in params):
        probs = keep_top_p(probs, _to_device([p.top_p for p in params], dev, probs.dtype))
    cdf = probs.double().cumsum(-1)
    target = uniforms.to(dev, torch.float64)[:, None] * cdf[:, -1:]
    # The first token whose CDF exceeds the target: never a zero-probability one.
    return torch.searchsorted(cdf, target, right=True)[:, 0].clamp(max=logits.shape[-1] - 1)


@dataclass
class SampledRow:
    token_id: int
    logprob: float
    top_logprobs: list[tuple[int, float]]
    done: bool = False          # the request's grammar is complete: it must end here


def sample_batch(logits: torch.Tensor, samplers: list[RowSampler]) -> list[SampledRow | Exception]:
    """logits [B, V] (float32, raw) → per row a token with its raw-logit log-probability, or the
    Exception that failed that row alone."""
    logprobs = torch.log_softmax(logits, dim=-1)
    chosen = logits.argmax(dim=-1)                 # right for plain-greedy rows, overwritten otherwise
    errors: dict[int, Exception] = {}
    special = [i for i, s in enumerate(samplers) if not s.plain_greedy]
    if special:
        special_rows = _to_device(special, logits.device)
        work = logits[special_rows]
        for j, i in enumerate(special):
            try:
                work[j] = samplers[i].adjust(work[j])
            except Exception as e:      # noqa: BLE001 — this row fails, the others go on
                errors[i] = e
        _mask_grammars(work, special, samplers, errors)
        picks = work.argmax(dim=-1)
        drawn = [j for j, i in enumerate(special) if not samplers[i].params.greedy and i not in errors]
        if drawn:
            uniforms = torch.stack([torch.rand((), generator=samplers[special[j]].generator,
                                               device=logits.device) for j in drawn])
            params = [samplers[special[j]].params for j in drawn]
            drawn_rows = _to_device(drawn, logits.device)
            try:
                picks[drawn_rows] = sample_rows(work[drawn_rows], params, uniforms)
            except Exception:           # noqa: BLE001 — redraw row by row: only the bad row fails
                for n, j in enumerate(drawn):
                    try:
                        picks[j] = sample_rows(work[j:j + 1], params[n:n + 1], uniforms[n:n + 1])[0]
                    except Exception as e:      # noqa: BLE001
                        errors[special[j]] = e
        chosen = chosen.clone()
        chosen[special_rows] = picks
    chosen_lp = logprobs.gather(1, chosen[:, None])[:, 0]
    n_top = max(s.params.top_logprobs for s in samplers)
    # One device→host transfer for the whole batch, the step's only wait for the device: token
    # ids (exact in float64) and float32 logprobs (exact too) packed in one tensor.
    parts = [chosen[:, None], chosen_lp[:, None]]
    if n_top:
        top_vals, top_ids = torch.topk(logprobs, n_top, dim=-1)
        parts += [top_ids, top_vals]
    packed = torch.cat([p.double() for p in parts], dim=1).tolist()
    out: list[SampledRow | Exception] = []
    for i, row in enumerate(packed):
        if i in errors:
            out.append(errors[i])
            continue
        tok, lp = int(row[0]), row[1]
        k = samplers[i].params.top_logprobs
        top = [(int(t), v) for t, v in zip(row[2:2 + k], row[2 + n_top:2 + n_top + k])]
        try:
            samplers[i].record(tok)
        except Exception as e:          # noqa: BLE001
            out.append(e)
            continue
        out.append(SampledRow(tok, lp, top, samplers[i].done))
    return out


def _mask_grammars(work: torch.Tensor, special: list[int], samplers: list[RowSampler],
                   errors: dict[int, Exception]) -> None:
    """Tokens each constrained row's grammar forbids → -inf, for all such rows at once."""
    rows = [j for j, i in enumerate(special) if samplers[i].grammar is not None and i not in errors]
    if not rows:
        return
    allowed, problems = allowed_tokens([samplers[special[j]].grammar for j in rows], work.shape[-1])
    index = _to_device(rows, work.device)
    work[index] = torch.where(_to_device(allowed, work.device), work[index], float("-inf"))
    for j, problem in zip(rows, problems):
        if problem is not None:
            errors[special[j]] = RuntimeError(f"grammar: {problem}")


def _to_device(values: list | torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Host values → a tensor on `device` without waiting for it: on CUDA through pinned memory,
    copied without blocking (the caching host allocator keeps the buffer until the copy ran)."""
    t = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)
