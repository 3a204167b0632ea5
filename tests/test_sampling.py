"""Per-request sampling: filters against brute-force references, seeds, reported logprobs."""

import pytest
import torch

from server.sampling import RowSampler, apply_repetition_penalty, keep_top_k, keep_top_p, sample_batch
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
