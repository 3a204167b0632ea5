"""Per-request sampling: filters against brute-force references, seeds, reported logprobs."""

import re

import pytest
import torch

from server.sampling import (RowSampler, apply_repetition_penalty, keep_top_k, keep_top_p, sample_batch,
                             sample_rows)
from server.types import InvalidRequestError, SamplingParams


def reference_top_p(logits: torch.Tensor, top_p: float) -> set[int]:
    order = torch.argsort(logits, descending=True).tolist()
    probs = torch.softmax(logits, -1)
    kept, mass = set(), 0.0
    for i in order:
        if mass >= top_p:
            break
        kept.add(i)
        mass += float(probs[i])
    return kept


@pytest.mark.parametrize("scale", [8.0, 0.01])   # peaked (candidate path) and flat (full-sort path)
@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.9, 0.999])
def test_top_p_keeps_the_smallest_set_reaching_p(scale, top_p):
    torch.manual_seed(0)
    logits = torch.randn(2, 2000, dtype=torch.float64) * scale
    probs = torch.softmax(logits, -1)
    kept = keep_top_p(probs, torch.tensor([top_p, 1.0], dtype=torch.float64))
    assert set(torch.nonzero(kept[0] > 0)[:, 0].tolist()) == reference_top_p(logits[0], top_p)
    assert torch.equal(kept[0][kept[0] > 0], probs[0][kept[0] > 0])
    assert torch.equal(kept[1], probs[1])      # its neighbour's top_p=1 keeps everything


def test_top_k_and_repetition_penalty():
    logits = torch.tensor([1.0, 5.0, -2.0, 3.0, 4.0])
    kept = keep_top_k(logits.repeat(3, 1), torch.tensor([2, 10, 0]))
    assert torch.equal(kept[0] > float("-inf"), torch.tensor([False, True, False, False, True]))
    assert torch.equal(kept[1], logits) and torch.equal(kept[2], logits)
    pen = apply_repetition_penalty(logits, {1, 2}, 2.0)
    assert pen.tolist() == [1.0, 2.5, -4.0, 3.0, 4.0]
    assert logits[1] == 5.0   # the caller's tensor is untouched


def rows(params_list, prompt=(1, 2, 3)):
    return [RowSampler(p, p.seed or 0, list(prompt), torch.device("cpu")) for p in params_list]


def test_seeded_row_draws_do_not_depend_on_neighbours():
    torch.manual_seed(0)
    target = torch.randn(300)
    p = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=1234)

    def draws(batch_size, neighbour_seed):
        samplers = rows([p] + [SamplingParams(temperature=1.3, seed=neighbour_seed + i)
                               for i in range(batch_size - 1)])
        out = []
        for _ in range(20):
            logits = torch.cat([target[None], torch.randn(batch_size - 1, 300)])
            out.append(sample_batch(logits, samplers)[0].token_id)
        return out

    alone = draws(1, 0)
    assert draws(5, 7) == alone and draws(3, 99) == alone
    assert len(set(alone)) > 1     # it really samples
    other_seed = rows([SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=1235)])
    assert [sample_batch(target[None], other_seed)[0].token_id for _ in range(20)] != alone


def test_logprobs_are_raw_log_softmax_and_greedy_is_argmax():
    torch.manual_seed(1)
    logits = torch.randn(3, 50)
    params = [SamplingParams(temperature=0, top_logprobs=3), SamplingParams(temperature=0.7, seed=5),
              SamplingParams(temperature=0, repetition_penalty=100.0)]
    out = sample_batch(logits, rows(params, prompt=[int(logits[2].argmax())]))
    ref = torch.log_softmax(logits, -1)
    assert out[0].token_id == int(logits[0].argmax())
    for i, o in enumerate(out):
        assert o.logprob == pytest.approx(float(ref[i, o.token_id]), abs=1e-6)
    top = torch.topk(ref[0], 3)
    assert [t for t, _ in out[0].top_logprobs] == top.indices.tolist()
    assert out[1].top_logprobs == []
    # The penalty pushes the (seen) argmax down, so greedy picks another token.
    assert out[2].token_id != int(logits[2].argmax())


def test_top_k_one_and_tiny_top_p_and_temperature_are_greedy():
    torch.manual_seed(2)
    logits = torch.randn(4, 100) * 50
    # A temperature that overflows logits/temperature, or a top_p that underflows, in float32
    # once made softmax NaN (500s the HTTP fuzz test found with 2e-257 and 1.7e-106).
    for params in (SamplingParams(temperature=1.5, top_k=1, seed=3), SamplingParams(top_p=1e-6, seed=4),
                   SamplingParams(top_p=1.7e-106, seed=7),
                   SamplingParams(temperature=2e-257, seed=5), SamplingParams(temperature=1e-6, seed=6)):
        out = sample_batch(logits, rows([params] * 4))
        assert [o.token_id for o in out] == logits.argmax(-1).tolist()


@pytest.mark.parametrize("field,value", [
    ("temperature", -0.1), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -1), ("max_new_tokens", 0),
    ("repetition_penalty", 0.0), ("seed", -1), ("stop", [""]), ("top_logprobs", 21),
    ("temperature", float("nan"))])
def test_invalid_params_name_the_field(field, value):
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(**{field: value}).validate()
    assert e.value.field == field


def test_batched_draws_follow_each_rows_filtered_distribution():
    """Many rows with two different settings drawn in one batched call: each setting's empirical
    frequencies match its own (temperature, top-k, top-p)-filtered distribution."""
    n = 3000
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]]).repeat(2 * n, 1)
    params = [SamplingParams(temperature=0.7, top_k=4), SamplingParams(temperature=1.5, top_p=0.8)] * n
    drawn = sample_rows(logits, params, torch.rand(2 * n, generator=torch.Generator().manual_seed(0)))
    freq = torch.stack([torch.bincount(drawn[i::2], minlength=6) / n for i in range(2)])
    want0 = torch.softmax(keep_top_k(logits[:1] / 0.7, torch.tensor([4])), -1)[0]
    want1 = keep_top_p(torch.softmax(logits[:1] / 1.5, -1), torch.tensor([0.8]))[0]
    want1 = want1 / want1.sum()
    torch.testing.assert_close(freq[0], want0, atol=0.03, rtol=0)
    torch.testing.assert_close(freq[1], want1, atol=0.03, rtol=0)
    assert freq[0, 4:].sum() == 0 and freq[1][want1 == 0].sum() == 0   # filtered tokens never drawn


def test_logit_bias_applies_to_greedy_and_sampled_rows_but_not_to_reported_logprobs():
    torch.manual_seed(3)
    logits = torch.randn(3, 40)
    params = [SamplingParams(temperature=0, logit_bias={7: 100.0}), SamplingParams(temperature=1.0, seed=1,
              logit_bias={9: 100.0}), SamplingParams(temperature=0, logit_bias={int(logits[2].argmax()): -100.0})]
    out = sample_batch(logits, rows(params))
    ref = torch.log_softmax(logits, -1)
    assert [o.token_id for o in out[:2]] == [7, 9]
    assert out[2].token_id == int(logits[2].topk(2).indices[1])
    assert out[0].logprob == pytest.approx(float(ref[0, 7]), abs=1e-6)
    with pytest.raises(InvalidRequestError, match="logit_bias"):
        SamplingParams(logit_bias={1: 100.5}).validate()


def test_a_failing_row_fails_alone():
    torch.manual_seed(4)
    logits = torch.randn(3, 30)
    good = [SamplingParams(temperature=0.9, seed=8), SamplingParams(temperature=0)]
    alone = sample_batch(logits[[0, 2]], rows(good))
    # A bias on a token outside the vocabulary (the engine refuses such requests; here it stands
    # for any fault in one row's preparation).
    bad = SamplingParams(temperature=0.9, seed=9, logit_bias={99: 1.0})
    out = sample_batch(logits, rows([good[0], bad, good[1]]))
    assert isinstance(out[1], Exception)
    assert [o.token_id for o in (out[0], out[2])] == [o.token_id for o in alone]


def test_grammar_masks_each_constrained_row(tiny_loaded):
    from server.grammar import GrammarCompiler
    from server.types import Grammar

    tok = tiny_loaded.tokenizer
    compiler = GrammarCompiler(tok, tiny_loaded.config.vocab_size)
    torch.manual_seed(5)
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0, seed=3), SamplingParams(temperature=0)]
    samplers = [RowSampler(p, p.seed or 0, [1], torch.device("cpu"),
                           compiler.matcher(Grammar("regex", "(ab|cd)+!")) if i < 2 else None)
                for i, p in enumerate(params)]
    texts, done = ["", ""], [False, False]
    for _ in range(40):
        logits = torch.randn(3, tiny_loaded.config.vocab_size)
        live = [i for i in range(2) if not done[i]] + [2]
        out = sample_batch(logits[live], [samplers[i] for i in live])
        assert out[-1].token_id == int(logits[2].argmax())      # the free row is untouched
        for i, o in zip(live[:-1], out[:-1]):
            texts[i] += tok.decode([o.token_id])
            done[i] = o.done
        if all(done):
            break
    assert all(done)
    assert all(re.fullmatch(r"(ab|cd)+!", t) for t in texts), texts
    with pytest.raises(InvalidRequestError, match="grammar"):
        compiler.matcher(Grammar("regex", "(unclosed"))


def test_a_top_k_past_the_vocabulary_keeps_everything():
    # Found by the HTTP fuzz test: top_k = 2**70 overflowed the index tensor and failed the batch.
    torch.manual_seed(5)
    logits = torch.randn(2, 30)
    huge = sample_batch(logits, rows([SamplingParams(temperature=0.9, seed=3, top_k=2 ** 70)] * 2))
    off = sample_batch(logits, rows([SamplingParams(temperature=0.9, seed=3, top_k=0)] * 2))
    assert [o.token_id for o in huge] == [o.token_id for o in off]


def test_a_row_the_batched_draw_cannot_take_fails_alone(monkeypatch):
    from server import sampling

    real = sampling.sample_rows

    def fails_on_poison(logits, params, uniforms):
        if any(p.temperature == 1.2345 for p in params):
            raise RuntimeError("poisoned row")
        return real(logits, params, uniforms)

    monkeypatch.setattr(sampling, "sample_rows", fails_on_poison)
    torch.manual_seed(6)
    logits = torch.randn(3, 30)
    good = [SamplingParams(temperature=0.9, seed=8), SamplingParams(temperature=0.7, seed=2)]
    alone = sample_batch(logits[[0, 2]], rows(good))
    out = sample_batch(logits, rows([good[0], SamplingParams(temperature=1.2345, seed=1), good[1]]))
    assert isinstance(out[1], RuntimeError)
    assert [o.token_id for o in (out[0], out[2])] == [o.token_id for o in alone]
