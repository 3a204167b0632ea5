"""Engine side of the API fields: prompt logprobs from the batched (chunked) prefill,
max_new_tokens=0, and a sampling failure that fails its own request only."""

import pytest
import torch

from server.engine import Engine
from server.types import EngineConfig, EngineError, GenerationRequest, SamplingParams
from test_engine import prompt_of, run_until_done, tiny_loaded_model


@pytest.fixture(scope="module")
def loaded():
    return tiny_loaded_model()


def test_prompt_logprobs_from_chunked_prefill_match_a_full_forward(loaded):
    engine = Engine(loaded, None, EngineConfig(max_batch=4, max_tokens_per_step=10, max_seq_len=128))
    prompts = [prompt_of(loaded, n, seed) for seed, n in enumerate((23, 7, 15))]
    requests = [GenerationRequest(prompts[0], SamplingParams(max_new_tokens=0, prompt_logprobs=3)),
                GenerationRequest(prompts[1], SamplingParams(max_new_tokens=4, temperature=0)),   # does not ask
                GenerationRequest(prompts[2], SamplingParams(max_new_tokens=2, temperature=0, prompt_logprobs=0))]
    results = run_until_done(engine, [engine.submit(r) for r in requests])
    assert results[0].finish_reason == "length" and results[0].token_ids == [] and results[0].prompt_tokens == 23
    assert results[1].prompt_logprobs is None and len(results[1].token_ids) == 4
    assert len(results[2].token_ids) == 2
    for ids, result, k in ((prompts[0], results[0], 3), (prompts[2], results[2], 0)):
        with torch.no_grad():
            ref = torch.log_softmax(loaded.model(torch.tensor([ids]))[0].float(), -1)
        assert result.prompt_logprobs[0] == (None, [])
        assert len(result.prompt_logprobs) == len(ids)
        got = torch.tensor([lp for lp, _ in result.prompt_logprobs[1:]])
        torch.testing.assert_close(got, ref[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0], atol=1e-4, rtol=0)
        for pos, (_, top) in enumerate(result.prompt_logprobs[1:]):
            assert [t for t, _ in top] == ref[pos].topk(k).indices.tolist() if k else top == []
    with pytest.raises(Exception, match="max_new_tokens"):
        engine.submit(GenerationRequest(prompts[1], SamplingParams(max_new_tokens=0)))


def test_a_sampling_failure_fails_only_its_request(loaded):
    engine = Engine(loaded, None, EngineConfig(max_batch=4, max_seq_len=128))
    params = SamplingParams(max_new_tokens=6, temperature=0.8, seed=3, ignore_eos=True)
    alone = run_until_done(engine, [engine.submit(GenerationRequest(prompt_of(loaded, 5, 1), params))])[0]
    good = engine.submit(GenerationRequest(prompt_of(loaded, 5, 1), params))
    doomed = engine.submit(GenerationRequest(prompt_of(loaded, 6, 2), params))
    # A fault in one row's preparation (a bias beyond the vocabulary, which submit() refuses).
    seq = next(s for s in engine.scheduler.waiting if s.payload.handle is doomed)
    seq.payload.sampler.bias = (torch.tensor([10 ** 6]), torch.tensor([1.0]))
    for _ in range(50):
        if good.done and doomed.done:
            break
        engine.step()
    with pytest.raises(EngineError, match="sampling failed"):
        doomed.wait(0)
    assert good.wait(0).token_ids == alone.token_ids
    assert engine.stats().running == 0
