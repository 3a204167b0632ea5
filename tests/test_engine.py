"""The batched engine on a tiny random model with real adapters from a real registry."""

import asyncio
import dataclasses
import json
from pathlib import Path

import pytest
import torch

from adapters.format import metadata_for, save_adapter
from adapters.registry import AdapterNotFoundError, AdapterRegistry
from adapters.store import AdapterStore
from model.adapter import AdapterBatch, AdapterWeights, compute_adapter_kv
from model.config import ModelConfig
from model.fingerprint import base_fingerprint
from model.llama import Transformer
from model.loading import LoadedModel
from server.engine import Engine
from server.scheduler import Scheduler, Sequence
from server.types import (EngineConfig, EngineOverloadedError, GenerationRequest,
                          InvalidRequestError, SamplingParams)
from test_detokenize import byte_bpe_tokenizer


def tiny_loaded_model() -> LoadedModel:
    tok = byte_bpe_tokenizer()
    cfg = ModelConfig(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=tok.vocab_size,
                      ffn_dim=128, max_seq_len=512)
    torch.manual_seed(0)
    model = Transformer(cfg).eval().requires_grad_(False)
    return LoadedModel(model, tok, cfg, base_fingerprint(model), "tiny", Path("."))


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    return tiny_loaded_model()


def random_adapter(model, seed: int, layers=(1, 2), k_len=4, per_head=False) -> AdapterWeights:
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    n_gates = cfg.n_heads if per_head else 1
    return AdapterWeights(list(layers), torch.randn(len(layers), k_len, cfg.dim, generator=g),
                          torch.rand(len(layers), n_gates, generator=g) + 0.5)


def upload(registry, loaded, tmp_path, name, weights):
    path = tmp_path / f"{name}-{id(weights)}.safetensors"
    save_adapter(path, weights, metadata_for(weights, loaded.model, "uploaded", fingerprint=loaded.fingerprint))
    return registry.upload(name, path.read_bytes())


@pytest.fixture
def registry(loaded, tmp_path):
    return AdapterRegistry(AdapterStore(tmp_path / "store"), loaded.model, loaded.fingerprint)


def reference_greedy(model, prompt, weights, n):
    """Greedy tokens and logprobs by full recomputation (no KV cache, batch of one)."""
    adapters = None
    if weights is not None:
        adapters = AdapterBatch.build([compute_adapter_kv(model, weights)], model.config.n_layers)
    ids, logprobs = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            lp = torch.log_softmax(model(torch.tensor([ids]), adapters=adapters)[0, -1], -1)
            ids.append(int(lp.argmax()))
            logprobs.append(float(lp[ids[-1]]))
    return ids[len(prompt):], logprobs


def prompt_of(loaded, n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, loaded.config.vocab_size, (n,), generator=g).tolist()


def greedy(n, **kw):
    return SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True, **kw)


def run_until_done(engine, handles, max_steps=1000):
    for _ in range(max_steps):
        if all(h.done for h in handles):
            return [h.wait(0) for h in handles]
        engine.step()
    raise AssertionError("requests did not finish")


def test_mixed_adapter_batch_matches_each_sequence_alone(loaded, registry, tmp_path):
    model = loaded.model
    adapters = {"a": random_adapter(model, 1), "b": random_adapter(model, 2, per_head=True),
                "c": random_adapter(model, 3, layers=(0, 2), k_len=7),
                "d": random_adapter(model, 4, layers=(2,), k_len=2)}
    for name, w in adapters.items():
        upload(registry, loaded, tmp_path, name, w)
    # Chunked prefill (12 tokens a step), requests arriving mid-generation, different lengths
    # (so blocks are freed while others are still running), a repeated adapter, the base.
    engine = Engine(loaded, registry, EngineConfig(max_batch=8, max_tokens_per_step=12, max_seq_len=128))
    jobs = [("a", 5, 6), ("b", 3, 10), (None, 17, 8), ("c", 30, 5), ("d", 9, 12), ("a", 11, 7), (None, 14, 4)]
    requests = [GenerationRequest(prompt_of(loaded, n, i), greedy(new), adapter=name)
                for i, (name, n, new) in enumerate(jobs)]
    handles = [engine.submit(r) for r in requests[:3]]
    engine.step()
    engine.step()
    handles += [engine.submit(r) for r in requests[3:]]
    results = run_until_done(engine, handles)
    for req, res, handle in zip(requests, results, handles):
        ref_tokens, ref_logprobs = reference_greedy(model, req.prompt_ids, adapters.get(req.adapter),
                                                    req.params.max_new_tokens)
        assert res.token_ids == ref_tokens
        assert res.logprobs == pytest.approx(ref_logprobs, abs=1e-4)
        assert res.finish_reason == "length" and res.prompt_tokens == len(req.prompt_ids)
        assert res.adapter_ref == (f"{req.adapter}@1" if req.adapter else None)
        events = list(handle)
        assert [e.token_id for e in events] == res.token_ids
        assert "".join(e.text for e in events) == res.text
        assert res.text == loaded.tokenizer.decode(res.token_ids)
    assert engine.stats().kv_blocks_used == 0 and registry.stats().pinned_count == 0
    # Adapters do change the output (the comparison above is not vacuous).
    assert results[0].token_ids != reference_greedy(model, requests[0].prompt_ids, None, 6)[0]


def test_seeded_sampling_does_not_depend_on_batch_neighbours(loaded, registry, tmp_path):
    upload(registry, loaded, tmp_path, "a", random_adapter(loaded.model, 5))
    params = SamplingParams(max_new_tokens=12, temperature=0.8, top_p=0.9, top_k=40, seed=42,
                            repetition_penalty=1.2, ignore_eos=True)
    target = GenerationRequest(prompt_of(loaded, 7, 0), params, adapter="a")

    def run(target, neighbours):
        engine = Engine(loaded, registry, EngineConfig(max_batch=8, max_tokens_per_step=16))
        handles = [engine.submit(r) for r in neighbours[:1]]
        engine.step()
        handles.append(engine.submit(target))
        handles += [engine.submit(r) for r in neighbours[1:]]
        return run_until_done(engine, handles)[len(neighbours[:1])]

    alone = run(target, [])
    crowd = [GenerationRequest(prompt_of(loaded, 5 + i, 10 + i),
                               SamplingParams(max_new_tokens=5 + 3 * i, temperature=1.1, seed=i, ignore_eos=True),
                               adapter="a" if i % 2 else None) for i in range(4)]
    assert run(target, crowd).token_ids == alone.token_ids
    assert alone.seed == 42
    other = run(GenerationRequest(target.prompt_ids, dataclasses.replace(params, seed=43), adapter="a"), [])
    assert other.token_ids != alone.token_ids      # the seed really drives the draws


def test_stop_string_across_token_boundary_is_cut_and_never_streamed(loaded):
    engine = Engine(loaded, None, EngineConfig(max_batch=2, max_tokens_per_step=8))
    prompt = prompt_of(loaded, 6, 3)
    free = engine.submit(GenerationRequest(prompt, greedy(40)))
    full = run_until_done(engine, [free])[0]
    pieces = [e.text for e in free]
    # A stop string made of the end of one token's text and the start of the next one's.
    offsets = [sum(len(p) for p in pieces[:i + 1]) for i in range(len(pieces))]
    boundary = next(o for i, o in enumerate(offsets[5:-1], 5)
                    if pieces[i] and pieces[i + 1] and full.text.find(full.text[o - 2:o + 2]) == o - 2)
    stop = full.text[boundary - 2:boundary + 2]
    handle = engine.submit(GenerationRequest(prompt, greedy(40, stop=["never-there", stop])))
    res = run_until_done(engine, [handle])[0]
    assert res.finish_reason == "stop" and res.stop_sequence == stop
    assert res.text == full.text[:boundary - 2]
    assert res.token_ids == full.token_ids[:len(res.token_ids)] and len(res.token_ids) < 40
    streamed = [e.text for e in handle]
    assert "".join(streamed) == res.text


def test_eos_and_stop_token_ids_finish(loaded):
    engine = Engine(loaded, None, EngineConfig(max_batch=2, max_tokens_per_step=8))
    prompt = prompt_of(loaded, 6, 4)
    first = run_until_done(engine, [engine.submit(GenerationRequest(prompt, greedy(5)))])[0]
    second_token = first.token_ids[1]
    res = run_until_done(engine, [engine.submit(GenerationRequest(
        prompt, greedy(5, stop_token_ids=[second_token])))])[0]
    assert res.finish_reason == "stop" and res.token_ids == first.token_ids[:2]
    # The tokenizer's EOS ends generation unless ignore_eos; here EOS is made the greedy choice
    # in a fresh copy of the model (the module's model is shared).
    eos = loaded.tokenizer.eos_id
    eos_loving = tiny_loaded_model()
    with torch.no_grad():
        head = eos_loving.model.output.weight
        head[eos] = head[second_token] * 50
    engine = Engine(eos_loving, None, EngineConfig(max_batch=2, max_tokens_per_step=8))
    res = run_until_done(engine, [engine.submit(GenerationRequest(
        prompt, SamplingParams(max_new_tokens=5, temperature=0)))])[0]
    assert res.finish_reason == "eos_token" and res.token_ids[-1] == eos


def test_cancellation_frees_the_blocks_within_one_step(loaded, registry, tmp_path):
    upload(registry, loaded, tmp_path, "a", random_adapter(loaded.model, 6))
    engine = Engine(loaded, registry, EngineConfig(max_batch=1, max_tokens_per_step=8))
    running = engine.submit(GenerationRequest(prompt_of(loaded, 5, 0), greedy(50), adapter="a"))
    queued = engine.submit(GenerationRequest(prompt_of(loaded, 5, 1), greedy(50), adapter="a"))
    for _ in range(3):
        engine.step()
    assert engine.stats().running == 1 and engine.stats().kv_blocks_used == 1 and engine.stats().waiting == 1
    running.cancel()
    queued.cancel()
    engine.step()
    assert engine.stats().kv_blocks_used == 0 and engine.stats().waiting == 0
    assert running.wait(0).finish_reason == "cancelled" and 0 < len(running.wait(0).token_ids) < 50
    assert queued.wait(0).finish_reason == "cancelled" and queued.wait(0).token_ids == []
    assert registry.stats().pinned_count == 0
    assert engine.stats().requests_cancelled_total == 2


def test_adapter_replaced_mid_generation_does_not_change_a_running_sequence(loaded, registry, tmp_path):
    v1, v2 = random_adapter(loaded.model, 7), random_adapter(loaded.model, 8)
    upload(registry, loaded, tmp_path, "swap", v1)
    engine = Engine(loaded, registry, EngineConfig(max_batch=4, max_tokens_per_step=8))
    prompt = prompt_of(loaded, 6, 5)
    handle = engine.submit(GenerationRequest(prompt, greedy(12), adapter="swap"))
    for _ in range(4):
        engine.step()
    upload(registry, loaded, tmp_path, "swap", v2)
    later = engine.submit(GenerationRequest(prompt, greedy(12), adapter="swap"))
    first, second = run_until_done(engine, [handle, later])
    assert first.adapter_ref == "swap@1" and second.adapter_ref == "swap@2"
    assert first.token_ids == reference_greedy(loaded.model, prompt, v1, 12)[0]
    assert second.token_ids == reference_greedy(loaded.model, prompt, v2, 12)[0]
    assert first.token_ids != second.token_ids


def test_bad_requests_fail_synchronously(loaded, registry, tmp_path):
    engine = Engine(loaded, registry, EngineConfig(max_batch=1, max_queue=2, max_seq_len=64,
                                                   max_tokens_per_step=8))
    with pytest.raises(AdapterNotFoundError, match="nope"):
        engine.submit(GenerationRequest([5, 6], greedy(4), adapter="nope"))
    with pytest.raises(InvalidRequestError) as e:
        engine.submit(GenerationRequest([5] * 60, greedy(5)))
    assert e.value.field == "max_new_tokens"
    with pytest.raises(InvalidRequestError, match="prompt"):
        engine.submit(GenerationRequest([], greedy(5)))
    with pytest.raises(InvalidRequestError, match="prompt"):
        engine.submit(GenerationRequest([loaded.config.vocab_size], greedy(5)))
    with pytest.raises(AdapterNotFoundError):
        Engine(loaded, None).submit(GenerationRequest([5], greedy(1), adapter="a"))


def test_full_queue_is_overloaded_and_leaks_no_lease(loaded, registry, tmp_path):
    upload(registry, loaded, tmp_path, "a", random_adapter(loaded.model, 9))
    engine = Engine(loaded, registry, EngineConfig(max_batch=1, max_queue=2, max_tokens_per_step=8))
    handles = [engine.submit(GenerationRequest([5, 6, 7], greedy(3), adapter="a")) for _ in range(2)]
    with pytest.raises(EngineOverloadedError):
        engine.submit(GenerationRequest([5, 6, 7], greedy(3), adapter="a"))
    assert registry.stats().pinned_count == 1      # one version, pinned by the two queued leases
    engine.step()                                   # one request moves into the batch
    handles.append(engine.submit(GenerationRequest([5, 6, 7], greedy(3))))
    assert all(r.finish_reason == "length" for r in run_until_done(engine, handles))
    assert registry.stats().pinned_count == 0


def test_kv_cache_is_reused_over_1000_short_requests(loaded, registry, tmp_path):
    upload(registry, loaded, tmp_path, "a", random_adapter(loaded.model, 10))
    engine = Engine(loaded, registry, EngineConfig(max_batch=8, max_queue=1000, max_tokens_per_step=64))
    k, v = engine.cache.k, engine.cache.v
    pointers = (k.data_ptr(), v.data_ptr())
    peak = []
    engine.add_completion_callback(lambda r: peak.append(len(engine.scheduler.running)))
    engine.start()
    try:
        handles = [engine.submit(GenerationRequest(prompt_of(loaded, 2 + i % 5, i), greedy(2),
                                                   adapter="a" if i % 3 else None)) for i in range(1000)]
        results = [h.wait(60) for h in handles]
    finally:
        engine.shutdown()
    assert all(r.finish_reason == "length" and len(r.token_ids) == 2 for r in results)
    assert engine.cache.k is k and engine.cache.v is v and (k.data_ptr(), v.data_ptr()) == pointers
    assert max(peak) <= 8
    stats = engine.stats()
    assert stats.kv_blocks_used == 0 and stats.running == 0 and stats.waiting == 0
    assert stats.requests_finished_total == 1000 and stats.tokens_generated_total == 2000
    assert registry.stats().pinned_count == 0


def test_queue_time_is_the_wait_for_a_row_before_prompt_processing(loaded):
    engine = Engine(loaded, None, EngineConfig(max_batch=1, max_tokens_per_step=8))
    first = engine.submit(GenerationRequest(prompt_of(loaded, 5, 0), greedy(6)))
    second = engine.submit(GenerationRequest(prompt_of(loaded, 5, 1), greedy(6)))
    a, b = run_until_done(engine, [first, second])
    # The second waited for the first's whole run (one row), then processed its prompt.
    assert 0 <= a.queue_s <= a.ttft_s and b.queue_s <= b.ttft_s
    assert b.queue_s >= a.latency_s - a.queue_s > 0


def test_async_streaming_generate_and_shutdown(loaded):
    engine = Engine(loaded, None, EngineConfig(max_batch=4, max_tokens_per_step=16)).start()

    async def main():
        handle = engine.submit(GenerationRequest(prompt_of(loaded, 5, 1), greedy(10)))
        events = [e async for e in handle]
        result = await handle.result()
        assert [e.token_id for e in events] == result.token_ids
        assert "".join(e.text for e in events) == result.text
        assert result.ttft_s <= result.latency_s
        again = await engine.generate(GenerationRequest(prompt_of(loaded, 5, 1), greedy(10)))
        assert again.token_ids == result.token_ids
        long = engine.submit(GenerationRequest(prompt_of(loaded, 5, 2), greedy(400)))
        async for _ in long:
            break
        await asyncio.to_thread(engine.shutdown, False)
        assert (await long.result()).finish_reason == "cancelled"

    asyncio.run(main())
    with pytest.raises(RuntimeError, match="shutting down"):
        engine.submit(GenerationRequest([5], greedy(1)))



def test_scheduler_budget_chunks_and_admission_by_blocks():
    sched = Scheduler(max_batch=3, max_tokens_per_step=10, max_queue=2, n_blocks=16, block_size=4)
    seqs = [Sequence(list(range(100 * k, 100 * k + n)), n) for k, n in enumerate((4, 25, 3, 2))]
    sched.add(seqs[0])
    sched.add(seqs[1])
    with pytest.raises(EngineOverloadedError):
        sched.add(seqs[2])
    sched.schedule()
    sched.add(seqs[2])
    sched.add(seqs[3])
    plan = sched.schedule()                         # only one row left: seqs[3] keeps waiting
    assert sched.running == seqs[:3] and list(sched.waiting) == [seqs[3]]
    # Blocks for each whole prompt (1 + 7 + 1 of 4 tokens).
    assert [len(s.block_table) for s in seqs] == [1, 7, 1, 0] and sched.blocks_used == 9
    # Rows × chunk width ≤ 10; most prompts completed, then most real tokens: 3 rows of
    # width 3 complete one prompt (seqs[2]) with 9 tokens, like 1 row of 4 (4 tokens) and
    # 2 rows of width 5 (4 + 5 tokens, completes seqs[0]) — the latter wins on tokens.
    assert plan.decode == [] and [(s, n) for s, n in plan.prefill] == [(seqs[0], 4), (seqs[1], 5)]
    sched.cached(seqs[0], 4)
    sched.cached(seqs[1], 5)
    seqs[0].token_ids.append(7)                     # its first generated token
    plan = sched.schedule()
    # seqs[0] decodes position 4: it gets a second block. Width 4 completes seqs[2]'s prompt.
    assert plan.decode == [seqs[0]] and len(seqs[0].block_table) == 2
    assert [(s, n) for s, n in plan.prefill] == [(seqs[1], 4), (seqs[2], 3)]
    sched.remove(seqs[0])
    assert sched.blocks_used == 8 and not seqs[0].running
    assert sched.schedule().admitted == [seqs[3]]
    # A short leftover does not shrink the other rows' chunks to its size.
    sched = Scheduler(max_batch=3, max_tokens_per_step=100, max_queue=3, n_blocks=64, block_size=16)
    rows = [Sequence(list(range(100 * k, 100 * k + n)), n) for k, n in enumerate((50, 40, 40))]
    for seq in rows:
        sched.add(seq)
    sched.schedule()
    sched.cached(rows[0], 48)
    assert [n for _, n in sched.schedule().prefill] == [2, 40]


def test_scheduler_preempts_the_newest_and_resumes_it_with_its_tokens():
    sched = Scheduler(max_batch=4, max_tokens_per_step=64, max_queue=4, n_blocks=4, block_size=4,
                      prefix_caching=False)
    old, new = Sequence([1, 2, 3, 4, 5], 5), Sequence([6, 7, 8], 3)
    sched.add(old)
    sched.add(new)
    plan = sched.schedule()
    assert plan.admitted == [old, new] and sched.blocks_used == 3
    for seq, n in plan.prefill:
        sched.cached(seq, n)
        seq.token_ids.append(9)
    # Both decode three tokens; on the way `new` takes the last free block (position 4)...
    for _ in range(3):
        plan = sched.schedule()
        assert plan.decode == [old, new]
        for seq in plan.decode:
            sched.cached(seq, 1)
            seq.token_ids.append(9)
    # ...and at position 8 old needs a fifth block: the newest is preempted for it.
    plan = sched.schedule()
    assert plan.preempted == [new] and plan.decode == [old] and list(sched.waiting) == [new]
    assert new.block_table == [] and new.n_cached == 0 and len(new.token_ids) == 7
    sched.remove(old)
    plan = sched.schedule()
    # It resumes by recomputing everything it had, generated tokens included.
    assert plan.admitted == [new] and plan.prefill == [(new, 7)] and new.prefill_len == 7


def test_bench_quick_runs_every_row_on_a_tiny_model(tiny_model_dir):
    from model.loading import load_model
    from server.bench import QUICK, format_table, measure

    report = measure(load_model(tiny_model_dir), QUICK, peers=True)
    engine, peers = report["engine"], report["transformers"]
    assert engine["adapters_tok_s"] > 0 and engine["base_tok_s"] > 0 and engine["batch1_decode_tok_s"] > 0
    assert peers["peft_per_adapter_batches_tok_s"] > 0 and peers["homogeneous_batch_tok_s"] > 0
    assert report["roofline"]["compute_tok_s"] > 0 and report["machine"]["copy_gb_s"] > 0
    assert engine["constrained_tok_s"] > 0
    assert set(report["ratios"]) == {"a_over_b", "h_over_b", "a_over_c", "a_over_d", "a_over_compute_roofline",
                                     "e_over_bandwidth_roofline", "e_over_transformers_batch1",
                                     "n_prefix_cache_ttft_speedup", "o32_over_compute_roofline",
                                     "o32_over_transformers", "o64_over_compute_roofline", "o64_over_transformers"}
    kinds = report["kinds"]
    assert kinds["lora_tok_s"] > 0 and kinds["mixed_tok_s"] > 0 and kinds["peft_lora_tok_s"] > 0
    images = report["images"]
    assert images["images_tok_s"] > 0 and images["cached_images_tok_s"] > 0 and images["encode_ms_per_image"] > 0
    assert images["cached_encode_s"] == 0       # (r): every image's features came from the cache
    assert set(kinds["cold_load_ms"]) == {"llama-adapter", "lora", "prefix-tuning"}
    assert [row["requests"] for row in report["concurrency"]] == [2, 4]
    assert all(row["tok_s"] > 0 and 0 < row["kv_used_peak_bytes"] <= row["kv_reserved_bytes"]
               for row in report["concurrency"])
    assert report["prefix_cache"]["ttft_p50_s"] > 0
    http = report["http"]       # `serve` in its own process, driven over HTTP; no vLLM python given
    assert http["engine"]["mixed"]["completion_tokens"] == QUICK.requests * QUICK.new_tokens
    assert http["engine"]["prefill"]["completion_tokens"] == QUICK.requests * QUICK.ttft_new_tokens
    assert http["vllm_skipped"] == "no --vllm-python given"
    prefill = report["prefill"]
    assert [c["chunk_tokens"] for c in prefill["chunks"]] == [32, 64]
    assert all(c["tok_s"] > 0 and c["transformers_tok_s"] > 0 for c in prefill["chunks"])
    assert prefill["ttft"]["requests"] == 4 and prefill["ttft"]["ttft_p50_s"] > 0
    table = format_table(report)
    assert all(f"({row})" in table for row in "abcdefghijklmnopqrst")
    assert "vLLM-CPU (skipped: no --vllm-python given)" in table


def test_bench_only_prefill_runs_rows_o_and_p_alone(tiny_model_dir):
    from model.loading import load_model
    from server.bench import QUICK, format_prefill_only, measure_prefill_only

    report = measure_prefill_only(load_model(tiny_model_dir), QUICK, peers=False)
    assert set(report["ratios"]) == {"o32_over_compute_roofline", "o64_over_compute_roofline"}
    table = "\n".join(format_prefill_only(report))
    assert "(o)" in table and "(p)" in table and "(a)" not in table


def test_generate_cli_json_with_and_without_adapter(tiny_model_dir, tmp_path, capsys):
    from model.loading import load_model
    from server.cli import main

    loaded = load_model(tiny_model_dir)
    weights = random_adapter(loaded.model, 11)
    path = tmp_path / "a.safetensors"
    save_adapter(path, weights, metadata_for(weights, loaded.model, "uploaded", fingerprint=loaded.fingerprint))
    base_args = ["generate", "--model", str(tiny_model_dir), "--weights", "fp32", "--prompt", "Hello fox",
                 "--max-new-tokens", "6", "--temperature", "0", "--json"]
    outputs = []
    for adapter in (None, weights):
        assert main(base_args + (["--adapter", str(path)] if adapter else [])) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["prompt_token_ids"] == loaded.tokenizer.encode("Hello fox")
        ref_tokens, ref_logprobs = reference_greedy(loaded.model, out["prompt_token_ids"], adapter, 6)
        n = len(out["token_ids"])
        assert out["token_ids"] == ref_tokens[:n] and (n == 6 or out["token_ids"][-1] in loaded.tokenizer.stop_ids)
        assert out["logprobs"] == pytest.approx(ref_logprobs[:n], abs=1e-4)
        assert out["text"] == loaded.tokenizer.decode(out["token_ids"])
        outputs.append(out["token_ids"])
    assert outputs[0] != outputs[1]
    assert main(base_args[:-1] + ["--chat"]) == 0
    assert capsys.readouterr().out.strip()


def test_generate_cli_rejects_an_adapter_for_another_model(tiny_model_dir, tmp_path, capsys):
    from server.cli import main

    other = Transformer(ModelConfig(dim=32, n_layers=2, n_heads=2, n_kv_heads=1, vocab_size=50, ffn_dim=64))
    weights = random_adapter(other, 12, layers=(0, 1))
    path = tmp_path / "other.safetensors"
    save_adapter(path, weights, metadata_for(weights, other, "uploaded"))
    code = main(["generate", "--model", str(tiny_model_dir), "--prompt", "hi", "--adapter", str(path)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error:") and "dim=32" in err and len(err.strip().splitlines()) == 1


def test_bench_only_modes_runs_a_b_e_in_every_weight_format(tiny_model_dir):
    from server.bench import QUICK
    from server.bench_modes import format_modes, measure_modes

    report = measure_modes(str(tiny_model_dir), QUICK, peers=False)
    rows = {r["weights"]: r for r in report["modes"]}
    assert list(rows) == ["fp32", "bf16", "int8", "int4", "gguf"]
    assert "not a .gguf file" in rows["gguf"]["skipped"]      # an HF directory has no 4-bit codes
    for mode in ("fp32", "bf16", "int8", "int4"):
        r = rows[mode]
        assert r["batch1_decode_tok_s"] > 0 and r["adapters_tok_s"] > 0 and r["base_tok_s"] > 0
        assert 0 < r["rss_loaded_mib"] <= r["rss_peak_mib"]
    table = "\n".join(format_modes(report, 1))
    assert table.count("\nint") == 2 and "gguf       skipped" in table and "llama.cpp batch-1 (skipped" in table
