"""The engine over its paged KV cache: block boundaries, preemption, prefix caching with
adapters, prompt logprobs, error isolation, and no leaked block over thousands of requests."""

import collections
import ctypes
import gc
import random
import resource
import weakref

import pytest
import torch

from server.engine import Engine
from server.sampling import RowSampler
from server.types import EngineConfig, GenerationRequest, InvalidRequestError, SamplingParams
from test_engine import (greedy, loaded, prompt_of, random_adapter, reference_greedy, registry,  # noqa: F401
                         run_until_done, upload)

LOGPROB_TOL = 1e-5      # float32, paged cache against full recomputation


def block_bytes(loaded, blocks: int) -> int:
    cfg = loaded.config
    return blocks * 2 * cfg.n_layers * cfg.n_kv_heads * 16 * cfg.head_dim * 4


def assert_matches_reference(model, requests, results, weights):
    for req, res in zip(requests, results):
        tokens, logprobs = reference_greedy(model, req.prompt_ids, weights.get(req.adapter),
                                            req.params.max_new_tokens)
        assert res.token_ids == tokens
        assert res.logprobs == pytest.approx(logprobs, abs=LOGPROB_TOL)


def test_paged_cache_with_preemption_and_prefix_hits_equals_full_recomputation(loaded, registry, tmp_path):
    model = loaded.model
    weights = {"a": random_adapter(model, 1), "b": random_adapter(model, 2, per_head=True),
               "c": random_adapter(model, 3, layers=(0, 2), k_len=7)}
    for name, w in weights.items():
        upload(registry, loaded, tmp_path, name, w)
    # 12 blocks of 16 tokens for 9 sequences that grow across block boundaries: the engine has
    # to preempt and resume, and the repeated prompts hit the prefix cache.
    engine = Engine(loaded, registry, EngineConfig(max_batch=6, max_tokens_per_step=40, max_seq_len=128,
                                                   kv_cache_memory=block_bytes(loaded, 12)))
    shared = prompt_of(loaded, 35, 0)
    jobs = [("a", shared, 30), (None, shared, 20), ("b", prompt_of(loaded, 17, 1), 40),
            ("a", shared + [7, 8], 25), (None, prompt_of(loaded, 5, 2), 45), ("c", shared, 18),
            (None, shared, 12), ("a", shared, 16), ("b", prompt_of(loaded, 31, 3), 33)]
    requests = [GenerationRequest(list(p), greedy(n), adapter=name) for name, p, n in jobs]
    handles = [engine.submit(r) for r in requests[:5]]
    for _ in range(6):
        engine.step()
    handles += [engine.submit(r) for r in requests[5:]]
    results = run_until_done(engine, handles, max_steps=3000)
    assert_matches_reference(model, requests, results, weights)
    stats = engine.stats()
    assert stats.preemptions_total > 0
    assert stats.prefix_cache_hits["a"] >= 32     # the shared prompt (resumes hit their own blocks too)
    assert stats.kv_blocks_used == 0 and engine.scheduler.blocks.all_free()
    assert registry.stats().pinned_count == 0


def test_prefix_blocks_are_never_shared_across_adapters_or_versions(loaded, registry, tmp_path):
    model = loaded.model
    a1, a2, b = random_adapter(model, 4), random_adapter(model, 5), random_adapter(model, 6)
    upload(registry, loaded, tmp_path, "a", a1)
    upload(registry, loaded, tmp_path, "b", b)
    engine = Engine(loaded, registry, EngineConfig(max_batch=4, max_tokens_per_step=64, max_seq_len=128))
    prompt = prompt_of(loaded, 40, 7)      # two full blocks to share

    def run(adapter):
        res = run_until_done(engine, [engine.submit(GenerationRequest(prompt, greedy(6), adapter=adapter))])[0]
        return res, engine.stats().prefix_cache_hits

    first_a, hits = run("a")
    assert hits.get("a", 0) == 0 and first_a.token_ids == reference_greedy(model, prompt, a1, 6)[0]
    again_a, hits = run("a")
    assert hits["a"] == 32 and again_a.token_ids == first_a.token_ids          # A's blocks, reused by A
    for adapter, w in ((None, None), ("b", b)):
        res, hits = run(adapter)
        assert hits.get(adapter, 0) == 0                                           # never A's blocks
        assert res.token_ids == reference_greedy(model, prompt, w, 6)[0]
    upload(registry, loaded, tmp_path, "a", a2)                                    # replace A: a@2
    replaced, hits = run("a")
    assert replaced.adapter_ref == "a@2" and hits["a"] == 32                       # no new hit
    assert replaced.token_ids == reference_greedy(model, prompt, a2, 6)[0] != first_a.token_ids
    pinned_old, hits = run("a@1")                                                  # a@1's blocks are still a@1's
    assert hits["a"] == 64 and pinned_old.token_ids == first_a.token_ids
    off = Engine(loaded, registry, EngineConfig(max_batch=4, max_tokens_per_step=64, max_seq_len=128,
                                                prefix_caching=False))
    for _ in range(2):
        run_until_done(off, [off.submit(GenerationRequest(prompt, greedy(2), adapter="a"))])
    assert off.stats().prefix_cache_hits == {}


def test_prefix_blocks_are_keyed_by_the_exact_composition_and_its_weights(loaded, registry, tmp_path):
    upload(registry, loaded, tmp_path, "a", random_adapter(loaded.model, 4))
    upload(registry, loaded, tmp_path, "b", random_adapter(loaded.model, 5))
    engine = Engine(loaded, registry, EngineConfig(max_batch=4, max_tokens_per_step=64, max_seq_len=128))
    prompt = prompt_of(loaded, 40, 8)      # two full blocks to share

    def run(adapter):
        res = run_until_done(engine, [engine.submit(GenerationRequest(prompt, greedy(4), adapter=adapter))])[0]
        return res, engine.stats().prefix_cache_hits.get("a+b", 0)

    first, hits = run("a:0.5+b")
    assert hits == 0
    again, hits = run("a:0.5+b")
    assert hits == 32 and again.token_ids == first.token_ids       # the same composition reuses its blocks
    other, hits = run("a:0.25+b")
    assert hits == 32                                               # other weights: other K/V, no hit
    fresh = Engine(loaded, registry, EngineConfig(max_batch=4, max_tokens_per_step=64, max_seq_len=128,
                                                  prefix_caching=False))
    alone = run_until_done(fresh, [fresh.submit(GenerationRequest(prompt, greedy(4), adapter="a:0.25+b"))])[0]
    assert other.token_ids == alone.token_ids and other.logprobs == pytest.approx(alone.logprobs, abs=LOGPROB_TOL)


def test_prompt_logprobs_with_no_new_tokens_come_from_the_prefill(loaded, registry, tmp_path):
    model = loaded.model
    w = random_adapter(model, 8)
    upload(registry, loaded, tmp_path, "a", w)
    engine = Engine(loaded, registry, EngineConfig(max_batch=4, max_tokens_per_step=16, max_seq_len=128))
    prompt = prompt_of(loaded, 37, 9)
    warm = engine.submit(GenerationRequest(prompt, greedy(1), adapter="a"))   # fills the prefix cache
    run_until_done(engine, [warm])
    handles = [engine.submit(GenerationRequest(prompt, SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True,
                                                                      prompt_logprobs=3), adapter="a"))
               for n in (0, 2)]
    only_prompt, with_tokens = run_until_done(engine, handles)
    from model.adapter import AdapterBatch, compute_adapter_kv
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([prompt]), adapters=AdapterBatch.build(
            [compute_adapter_kv(model, w)], model.config.n_layers))[0], -1)
    assert only_prompt.finish_reason == "length" and only_prompt.token_ids == [] and only_prompt.text == ""
    for res in (only_prompt, with_tokens):
        assert res.prompt_logprobs[0] == (None, [])
        assert len(res.prompt_logprobs) == len(prompt)
        for pos in range(1, len(prompt)):
            lp, top = res.prompt_logprobs[pos]
            assert lp == pytest.approx(float(ref[pos - 1, prompt[pos]]), abs=LOGPROB_TOL)
            vals, ids = torch.topk(ref[pos - 1], 3)
            assert [t for t, _ in top] == ids.tolist()
    assert len(with_tokens.token_ids) == 2
    with pytest.raises(InvalidRequestError, match="max_new_tokens"):
        engine.submit(GenerationRequest(prompt, greedy(0)))       # 0 new tokens only with prompt logprobs


def test_a_prompt_longer_than_the_cache_is_refused_at_submit(loaded):
    engine = Engine(loaded, None, EngineConfig(max_batch=2, max_tokens_per_step=8, max_seq_len=512,
                                               kv_cache_memory=block_bytes(loaded, 4)))
    with pytest.raises(InvalidRequestError) as e:
        engine.submit(GenerationRequest(prompt_of(loaded, 70, 0), greedy(1)))
    assert e.value.field == "prompt" and "KV cache (64 tokens)" in str(e.value)
    with pytest.raises(InvalidRequestError) as e:
        engine.submit(GenerationRequest(prompt_of(loaded, 60, 0), greedy(10)))
    assert e.value.field == "max_new_tokens"
    with pytest.raises(ValueError, match="holds no KV-cache block"):
        Engine(loaded, None, EngineConfig(kv_cache_memory=1000))


def test_a_poisoned_row_fails_only_its_own_request(loaded, registry, tmp_path, monkeypatch):
    upload(registry, loaded, tmp_path, "a", random_adapter(loaded.model, 10))
    adjust = RowSampler.adjust

    def poisoned(self, logits):
        if self.params.seed == 666:
            raise RuntimeError("poisoned sampler")
        return adjust(self, logits)

    monkeypatch.setattr(RowSampler, "adjust", poisoned)
    engine = Engine(loaded, registry, EngineConfig(max_batch=4, max_tokens_per_step=32))
    params = [SamplingParams(max_new_tokens=6, temperature=0.7, seed=s, ignore_eos=True) for s in (1, 666, 2)]
    handles = [engine.submit(GenerationRequest(prompt_of(loaded, 9, i), p, adapter="a" if i else None))
               for i, p in enumerate(params)]
    for _ in range(50):
        if all(h.done for h in handles):
            break
        engine.step()
    good = [handles[0].wait(0), handles[2].wait(0)]
    assert all(r.finish_reason == "length" and len(r.token_ids) == 6 for r in good)
    with pytest.raises(Exception, match="poisoned sampler"):
        handles[1].wait(0)
    assert engine.stats().kv_blocks_used == 0 and registry.stats().pinned_count == 0


def _rss_bytes() -> int:
    """Resident bytes of live memory: garbage collected, freed heap returned to the system."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


@pytest.fixture
def one_thread():
    """Thousands of tiny steps: one torch thread skips a parallel region's wake-ups per op
    (over 10× faster on a busy 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_thousands_of_random_requests_return_every_block(loaded, registry, tmp_path, one_thread):
    upload(registry, loaded, tmp_path, "a", random_adapter(loaded.model, 11))
    upload(registry, loaded, tmp_path, "b", random_adapter(loaded.model, 12, k_len=9))
    # A small cache (24 blocks) for up to 16 rows: preemption is routine.
    engine = Engine(loaded, registry, EngineConfig(max_batch=16, max_queue=64, max_tokens_per_step=96,
                                                   max_seq_len=96, kv_cache_memory=block_bytes(loaded, 24)))
    reasons: dict[str, int] = {}
    engine.add_completion_callback(lambda r: reasons.__setitem__(r.finish_reason, reasons.get(r.finish_reason, 0) + 1))
    recent = collections.deque(maxlen=20)      # nothing else keeps a request alive
    rss = []
    # The same 2,500 random requests twice: the first round meets every tensor shape (torch's
    # and oneDNN's per-shape caches fill up), so the second must not grow at all.
    for _ in range(2):
        rng = random.Random(0)
        for i in range(2500):
            n = rng.randint(1, 40)
            shared = [3] * 16 if rng.random() < 0.3 else []     # some prompts share a first block
            params = SamplingParams(max_new_tokens=rng.randint(1, 4), temperature=rng.choice([0, 0.9]),
                                    seed=i, ignore_eos=True)
            recent.append(engine.submit(GenerationRequest(shared + prompt_of(loaded, n, i), params,
                                                          adapter=rng.choice([None, "a", "b"]))))
            if rng.random() < 0.1:
                rng.choice(recent).cancel()
            while engine.stats().waiting >= 32:
                engine.step()
        while engine._has_work():
            engine.step()
        rss.append(_rss_bytes())
    stats = engine.stats()
    assert stats.preemptions_total > 0 and stats.requests_cancelled_total > 0
    assert stats.requests_finished_total == 5000 == reasons["length"] + reasons["cancelled"]
    assert engine.scheduler.blocks.all_free() and stats.kv_blocks_used == 0
    assert stats.running == 0 and stats.waiting == 0 and registry.stats().pinned_count == 0
    assert rss[1] - rss[0] < 2 << 20           # flat: under 1 KiB per request


def test_a_burst_sharing_a_prompt_waits_for_its_blocks_instead_of_recomputing_them(loaded):
    engine = Engine(loaded, None, EngineConfig(max_batch=8, max_tokens_per_step=64, max_seq_len=128))
    prompt = prompt_of(loaded, 40, 13)         # two full blocks
    requests = [GenerationRequest(prompt + [5 + i], greedy(3)) for i in range(4)]
    handles = [engine.submit(r) for r in requests]
    engine.step()
    assert engine.stats().running == 1        # the others wait for the first one's blocks
    results = run_until_done(engine, handles)
    stats = engine.stats()
    assert stats.prefix_cache_hits[None] == 3 * 32 and stats.prompt_tokens_total == 41 + 3 * 9
    assert_matches_reference(loaded.model, requests, results, {})


def test_kv_cache_memory_flag_takes_bytes_with_units_or_a_fraction():
    import argparse

    from server.serve import memory_size

    assert memory_size("2GiB") == 2 << 30 and memory_size("512MB") == 512 * 10**6
    assert memory_size("1.5gib") == 3 << 29 and memory_size("4096") == 4096 and memory_size("0.8") == 0.8
    for bad in ("lots", "2XB", "0", "-1GiB"):
        with pytest.raises(argparse.ArgumentTypeError):
            memory_size(bad)


def _gathered(cache, table, n):
    """A sequence's first n keys/values read through its block table: [layers, n, kv head, dim]."""
    slots = torch.tensor([table[p // cache.block_size] * cache.block_size + p % cache.block_size for p in range(n)])
    return cache.k[:, slots], cache.v[:, slots]


def test_an_engine_s_kv_cache_is_freed_with_it_not_at_the_next_garbage_collection(loaded, registry):
    engine = Engine(loaded, registry, EngineConfig(max_batch=4, max_tokens_per_step=64, max_seq_len=128))
    run_until_done(engine, [engine.submit(GenerationRequest(prompt_of(loaded, 20, 0), greedy(3)))])
    engine.shutdown(graceful=False)
    cache = weakref.ref(engine.cache)
    gc.disable()            # a reference cycle would keep it (the pool, gigabytes in serving) alive here
    try:
        del engine
        assert cache() is None
    finally:
        gc.enable()


def test_the_cache_zeroes_each_block_once_when_a_step_first_uses_it():
    from model.kv_cache import PagedKVCache

    cache = PagedKVCache(n_layers=2, n_blocks=10, n_kv_heads=2, head_dim=4, block_size=4)
    for pool in (cache.k, cache.v):
        pool[:, :40].fill_(float("nan"))       # what never-used memory may hold

    def block(pool, b):
        return pool[:, b * 4:(b + 1) * 4]

    cache.prepare([5, 2, 3, 3])
    for pool in (cache.k, cache.v):
        assert all(bool((block(pool, b) == 0).all()) for b in (2, 3, 5))
        assert all(bool(block(pool, b).isnan().all()) for b in (0, 1, 4, 6, 9))   # only the blocks used
        block(pool, 3).fill_(7.0)                   # a step writes block 3
    cache.prepare(iter([3, 4, 10]))                 # 10: the scratch block, zeroed from the start
    for pool in (cache.k, cache.v):
        assert bool((block(pool, 3) == 7).all())    # written blocks are never zeroed again
        assert bool((block(pool, 4) == 0).all()) and bool((block(pool, 10) == 0).all())


def test_decode_rows_hold_each_running_sequence_through_joins_departures_and_preemption():
    from model.kv_cache import PagedKVCache

    torch.manual_seed(0)
    cache = PagedKVCache(n_layers=2, n_blocks=200, n_kv_heads=2, head_dim=4, block_size=4)
    cache.prepare(range(200))
    cache.k.normal_()
    cache.v.normal_()
    rows = cache.decode_rows
    free = list(range(200))
    random.Random(0).shuffle(free)
    seqs = {name: [free.pop() for _ in range(10)] for name in "abcdef"}     # name → block table
    lengths = {name: n for name, n in zip("abcdef", (5, 17, 9, 30, 1, 12))}

    def place_and_check(names):
        order = rows.place(names, [seqs[n] for n in names], [lengths[n] for n in names])
        assert sorted(order) == list(range(len(names)))
        # The forward appends each row's token: write one to the pool and to the rows alike.
        k = torch.randn(len(names), 2, 1, 4)
        v = torch.randn(len(names), 2, 1, 4)
        ordered = [names[i] for i in order]
        slots = torch.tensor([seqs[n][lengths[n] // 4] * 4 + lengths[n] % 4 for n in ordered])
        for layer in range(2):
            cache.k[layer, slots], cache.v[layer, slots] = k[:, :, 0], v[:, :, 0]
            keys, values = rows.write_and_read(layer, k, v, max(lengths[n] for n in ordered) + 1)
            for r, name in enumerate(ordered):
                n = lengths[name] + 1
                want_k, want_v = _gathered(cache, seqs[name], n)
                assert torch.equal(keys[r, :, :n].transpose(0, 1), want_k[layer])
                assert torch.equal(values[r, :, :n].transpose(0, 1), want_v[layer])
        for name in names:
            lengths[name] += 1
        return ordered

    first = place_and_check(list("abcdef"))
    kept = place_and_check(list("abcdef"))
    assert kept == first                            # a steady batch keeps its rows
    # b and c finish, g joins; then the batch shrinks so rows past it move down.
    seqs["g"], lengths["g"] = [free.pop() for _ in range(10)], 3
    place_and_check(list("adefg"))
    place_and_check(list("ag"))
    # a is preempted and recomputed into new blocks (a new block-table list): its row is refilled.
    seqs["a"] = [free.pop() for _ in range(10)]
    place_and_check(list("agd"))
    # Past the pool's own size the copies are refused (the runner then gathers).
    assert rows.place(["x"] * 1, [list(range(10))], [790]) is None


def test_decoding_through_contiguous_rows_equals_full_recomputation(loaded, registry, tmp_path):
    model = loaded.model
    weights = {"a": random_adapter(model, 11), "b": random_adapter(model, 12, layers=(0, 2), k_len=5)}
    for name, w in weights.items():
        upload(registry, loaded, tmp_path, name, w)
    engine = Engine(loaded, registry, EngineConfig(max_batch=6, max_tokens_per_step=64, max_seq_len=160))
    jobs = [("a", 9, 20), (None, 20, 8), ("b", 3, 14), (None, 40, 30), ("a", 14, 5), ("b", 30, 6)]
    requests = [GenerationRequest(prompt_of(loaded, n, 20 + i), greedy(m), adapter=name)
                for i, (name, n, m) in enumerate(jobs)]
    handles = [engine.submit(r) for r in requests[:4]]
    widths = set()
    for step in range(400):
        if step == 6:       # joins while others run; staggered lengths make rows leave mid-batch
            handles += [engine.submit(r) for r in requests[4:]]
        if step > 6 and all(h.done for h in handles):
            break
        engine.step()
        if engine.cache.decode_rows.k is not None:
            widths.add(engine.cache.decode_rows.k.shape[2])
    assert len(widths) >= 2         # the rows were used, and grew with the context
    assert_matches_reference(model, requests, [h.wait(0) for h in handles], weights)
