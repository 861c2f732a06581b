"""Prefix caching: page bookkeeping, and the engine's outputs with and without it."""

import dataclasses

import numpy as np
import pytest

from meshserve.runtime.block_manager import BlockManager, chain_hash
from meshserve.runtime.engine import Engine, EngineConfig
from meshserve.runtime.sampling import SamplingParams
from tests.runtime.conftest import greedy_reference


def test_chain_hash_names_the_whole_prefix():
    a = chain_hash(b"salt", [1, 2, 3, 4])
    assert a == chain_hash(b"salt", [1, 2, 3, 4])
    assert a != chain_hash(b"other", [1, 2, 3, 4]) and a != chain_hash(b"salt", [1, 2, 3, 5])
    assert chain_hash(a, [5, 6]) != chain_hash(chain_hash(b"salt", [9, 9, 9, 9]), [5, 6])


def test_cached_pages_wait_on_an_lru_and_are_evicted_oldest_first():
    bm = BlockManager(5, 4, prefix_caching=True)  # 4 usable pages
    a, b = bm.grow([], 8), bm.grow([], 8)
    ha = [chain_hash(b"salt", [0, 1, 2, 3])]
    ha.append(chain_hash(ha[0], [4, 5, 6, 7]))
    for page, h in zip(a, ha):
        bm.register(page, h)
    assert bm.lookup(ha) == a and bm.lookup([chain_hash(b"salt", [9, 9, 9, 9])] + ha[1:]) == []
    bm.release(a)
    assert bm.num_free == 2 and bm.num_cached == 2  # unreferenced, still cached
    c = bm.lookup(ha)
    bm.share(c)  # reuse: back in use, off the LRU
    assert c == a and all(bm.ref_count(p) == 1 for p in c) and bm.num_free == 0
    bm.release(c)
    d = bm.grow([], 4)  # no never-cached page is free: evicts the LRU's oldest, the chain's tail
    assert bm.lookup(ha) == [a[0]] and bm.evictions == 1
    bm.release(d)
    bm.release(b)
    assert bm.num_free == bm.num_usable


TINY = EngineConfig(page_size=4, kv_cache_bytes=64 * 2 * 2 * 4 * 2 * 8 * 4, max_seq_len=128, max_num_seqs=4,
                    max_num_batched_tokens=32, max_prefill_chunk=32, prefill_buckets=(8, 32),
                    decode_buckets=(4,), context_buckets=(32,))


@pytest.fixture(scope="module")
def engines(tiny_ckpt):
    return (Engine(tiny_ckpt, TINY),
            Engine(tiny_ckpt, dataclasses.replace(TINY, enable_prefix_caching=False)))


def shared_prefix_prompts(seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    prefix = rng.integers(0, 260, 37).tolist()
    return [prefix + rng.integers(0, 260, n).tolist() for n in (1, 5, 12, 3)] + [prefix[:16], prefix]


def test_outputs_equal_with_and_without_the_prefix_cache(engines, tiny_ckpt):
    cached, plain = engines
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    prompts = shared_prefix_prompts(0)
    first = cached.generate(prompts[:1], params)  # fills the cache
    outputs = []
    rid_cached = {}
    for p in prompts[1:]:  # one at a time: each finds the prefix cached
        rid = cached.add_request(p, params)
        while cached.has_unfinished:
            for out in cached.step():
                if out.finished:
                    rid_cached[out.request_id] = out.cached_tokens
        outputs.append(rid)
    together = cached.generate(prompts, params)  # and all at once
    expected = plain.generate(prompts, params)
    assert [c.token_ids for c in first] == [expected[0].token_ids]
    assert [c.token_ids for c in together] == [e.token_ids for e in expected]
    for p, e in zip(prompts[:2], expected[:2]):
        assert list(e.token_ids) == greedy_reference(tiny_ckpt, p, 10)
    hits = list(rid_cached.values())
    assert hits[:3] == [36, 36, 36] and hits[3] == 12 and hits[4] == 36  # whole pages, never the last token
    stats = cached.stats()
    assert stats["prefix_hit_tokens"] > 0
    assert cached.kv.num_free == cached.kv.num_usable  # cached pages count as free
    assert plain.stats()["prefix_hit_tokens"] == 0


def test_eviction_under_pressure_keeps_outputs_right(tiny_ckpt):
    small = dataclasses.replace(TINY, kv_cache_bytes=16 * 2 * 2 * 4 * 2 * 8 * 4, max_seq_len=60)  # 15 usable pages
    engine = Engine(tiny_ckpt, small)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, 260, n).tolist() for n in (20, 23, 17, 30)] * 2
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    out = engine.generate(prompts, params)
    for p, c in zip(prompts, out):
        assert list(c.token_ids) == greedy_reference(tiny_ckpt, p, 8)
    assert engine.kv.evictions > 0 and engine.kv.num_free == engine.kv.num_usable


def test_host_tier_serves_evicted_prefixes_with_the_same_outputs(engines, tiny_ckpt):
    _, plain = engines
    engine = Engine(tiny_ckpt, dataclasses.replace(TINY, host_kv_bytes=2**20))
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    prompts = shared_prefix_prompts(2)
    expected = [list(c.token_ids) for c in plain.generate(prompts, params)]
    assert [list(c.token_ids) for c in engine.generate(prompts[:1], params)] == expected[:1]
    assert engine.evict_prefix_cache() > 0  # the prefix's pages leave the device for host memory
    assert engine.kv.num_cached == 0 and engine.stats()["pages_host"] > 0
    got, cached = [], []
    for p in prompts[1:]:
        rid = engine.add_request(p, params)
        tokens = []
        while engine.has_unfinished:
            for out in engine.step():
                tokens.extend(out.token_ids)
                if out.finished:
                    cached.append(out.cached_tokens)
        got.append(tokens)
        engine.evict_prefix_cache()  # every request finds its prefix on the host, not the device
    assert got == expected[1:]
    assert cached[:3] == [36, 36, 36]
    stats = engine.stats()
    assert stats["prefix_lower_hit_tokens"] > 0 and stats["host_pages_in"] > 0
    assert engine.kv.num_free == engine.kv.num_usable


def test_host_tier_under_pressure_stays_correct(tiny_ckpt):
    """A small device pool evicts on its own; a small host tier drops pages too: outputs never change."""
    config = dataclasses.replace(TINY, kv_cache_bytes=24 * 2 * 2 * 4 * 2 * 8 * 4, max_seq_len=64,
                                 host_kv_bytes=12 * 2 * 2 * 4 * 2 * 8 * 4)
    engine = Engine(tiny_ckpt, config)
    rng = np.random.default_rng(3)
    prefixes = [rng.integers(0, 260, 24).tolist() for _ in range(3)]
    prompts = [prefixes[i % 3] + rng.integers(0, 260, 1 + i % 5).tolist() for i in range(12)]
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    out = engine.generate(prompts, params)
    for p, c in zip(prompts, out):
        assert list(c.token_ids) == greedy_reference(tiny_ckpt, p, 6)
    stats = engine.stats()
    assert stats["host_pages_out"] > 0 and engine.kv.num_free == engine.kv.num_usable


# ---- tier 3: the tensorstore store -----------------------------------------------------------------


def run_one(engine, prompt, params):
    """Tokens and cached-token count of one request run alone."""
    engine.add_request(prompt, params)
    tokens, cached = [], None
    while engine.has_unfinished:
        for out in engine.step():
            tokens.extend(out.token_ids)
            if out.finished:
                cached = out.cached_tokens
    return tokens, cached


@pytest.fixture(scope="module")
def expected(engines):
    _, plain = engines
    prompts = shared_prefix_prompts(4)
    out = plain.generate(prompts, SamplingParams(max_tokens=8, ignore_eos=True))
    return prompts, [list(c.token_ids) for c in out]


def store_engine(tiny_ckpt, folder):
    return Engine(tiny_ckpt, dataclasses.replace(TINY, host_kv_bytes=0, kv_store=str(folder)))


def test_store_tier_outputs_and_restart(tiny_ckpt, expected, tmp_path):
    prompts, want = expected
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    engine = store_engine(tiny_ckpt, tmp_path / "kv")
    assert run_one(engine, prompts[0], params) == (want[0], 0)
    engine.evict_prefix_cache()  # no host memory: straight to the store
    assert engine.stats()["pages_store"] >= 9
    assert run_one(engine, prompts[1], params) == (want[1], 36)  # a store hit
    assert engine.stats()["store_hit_pages"] == 9
    events = {(e.kind, e.tier) for e in engine.drain_kv_events()}
    assert {("stored", "device"), ("removed", "device"), ("stored", "store")} <= events
    del engine
    restarted = store_engine(tiny_ckpt, tmp_path / "kv")  # a new server on the same store
    assert restarted.stats()["pages_store"] >= 9
    assert run_one(restarted, prompts[2], params) == (want[2], 36)


def test_store_faults_are_misses_never_wrong_output(tiny_ckpt, expected, tmp_path):
    prompts, want = expected
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    engine = store_engine(tiny_ckpt, tmp_path / "kv")
    run_one(engine, prompts[0], params)
    engine.evict_prefix_cache()
    hashes, parent = [], engine.kv.salt
    for i in range(9):  # the shared prefix's pages, by the names the store gives them
        parent = chain_hash(parent, prompts[0][4 * i:4 * i + 4])
        hashes.append(parent)
    files = [tmp_path / "kv" / "kv" / h.hex() for h in hashes]
    assert all(f.is_file() for f in files)
    good = files[0].read_bytes()

    data = bytearray(good)
    data[-5] ^= 0xFF  # flipped bytes in the first page: nothing of the chain can be used
    files[0].write_bytes(bytes(data))
    flipped = store_engine(tiny_ckpt, tmp_path / "kv")
    assert run_one(flipped, prompts[1], params) == (want[1], 0)
    assert flipped.stats()["store_misses"] == 1

    files[0].write_bytes(good)
    files[3].write_bytes(files[3].read_bytes()[:40])  # a truncated fourth page: three pages used
    truncated = store_engine(tiny_ckpt, tmp_path / "kv")
    assert run_one(truncated, prompts[2], params) == (want[2], 12)
    assert truncated.stats()["store_misses"] == 1

    for f in (tmp_path / "kv" / "kv").iterdir():  # the whole store (its index is its keys) deleted
        f.unlink()
    gone = store_engine(tiny_ckpt, tmp_path / "kv")
    assert run_one(gone, prompts[3], params) == (want[3], 0)


def test_the_scheduler_never_reads_the_store(tiny_ckpt, expected, tmp_path, monkeypatch):
    """Store reads happen in the copy phase, after `schedule()`: a store whose reads fail inside it
    would fail the step; the copies in still come from the store."""
    from meshserve.runtime.kv_tiers import StoreTier

    prompts, want = expected
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    engine = store_engine(tiny_ckpt, tmp_path / "kv")
    run_one(engine, prompts[0], params)
    engine.evict_prefix_cache()
    scheduling, reads = [False], []
    real_get, real_schedule = StoreTier.get, engine.scheduler.schedule

    def get(self, page_hash):
        if scheduling[0]:
            raise AssertionError("schedule() read the store")
        reads.append(page_hash)
        return real_get(self, page_hash)

    def schedule(now):
        scheduling[0] = True
        try:
            return real_schedule(now)
        finally:
            scheduling[0] = False

    monkeypatch.setattr(StoreTier, "get", get)
    engine.scheduler.schedule = schedule
    assert run_one(engine, prompts[1], params) == (want[1], 36) and len(reads) == 9


def test_two_servers_share_one_store(tiny_ckpt, expected, tmp_path):
    prompts, want = expected
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    a, b = store_engine(tiny_ckpt, tmp_path / "kv"), store_engine(tiny_ckpt, tmp_path / "kv")
    for engine in (a, b):  # both write the same prefix pages
        run_one(engine, prompts[0], params)
        engine.evict_prefix_cache()
    reader = store_engine(tiny_ckpt, tmp_path / "kv")
    assert run_one(reader, prompts[3], params) == (want[3], 36)


def test_a_failing_store_is_turned_off_and_serving_goes_on(tiny_ckpt, expected, tmp_path, caplog):
    prompts, want = expected
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    engine = store_engine(tiny_ckpt, tmp_path / "kv")
    blocker = tmp_path / "kv" / "kv"
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_text("a file where the store's folder should be: every write fails")
    run_one(engine, prompts[0], params)
    engine.evict_prefix_cache()
    assert engine.stats()["store_enabled"] is False and "disabled" in caplog.text
    assert run_one(engine, prompts[1], params) == (want[1], 0)


def test_persist_on_shutdown_then_restart_hits_the_store(tiny_ckpt, expected, tmp_path):
    prompts, want = expected
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    config = dataclasses.replace(TINY, host_kv_bytes=2**20, kv_store=str(tmp_path / "kv"))
    engine = Engine(tiny_ckpt, config)
    run_one(engine, prompts[0], params)
    assert engine.stats()["pages_store"] == 0  # all still on the device
    assert engine.persist_prefix_cache() >= 9  # what a server does when it stops
    restarted = Engine(tiny_ckpt, config)
    assert run_one(restarted, prompts[1], params) == (want[1], 36)
    assert restarted.stats()["store_hit_pages"] == 9


def test_copies_from_a_lower_tier_count_against_the_step_budget():
    from meshserve.runtime.kv_manager import KVManager
    from meshserve.runtime.scheduler import Scheduler, SchedulerConfig, Sequence

    tokens = list(range(41))
    hashes, parent = set(), b"m"
    for i in range(10):
        parent = chain_hash(parent, tokens[4 * i:4 * i + 4])
        hashes.add(parent)

    class Index:  # all 10 full pages are in the lower tier
        holds = hashes.__contains__

    kv = KVManager(64, 4, prefix_caching=True, salt=b"m", lower=Index(), onboard_page_cost=2)
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=16, max_prefill_chunk=16), kv)
    sched.add(Sequence("a", tokens, len(tokens)))
    plan = sched.schedule(0.0)
    assert len(plan.onboard) == 7  # 7 pages × 2 = 14 of the 16-token budget …
    assert plan.prefills[0].start == 28 and plan.prefills[0].end == 30  # … leave 2 tokens to compute


def test_a_store_page_of_another_shape_or_dtype_is_a_miss(tmp_path):
    from meshserve.runtime.kv_tiers import StoreTier

    store = StoreTier(str(tmp_path / "kv"), (4, 8, 2, 16), np.float32)
    good, wrong_shape, wrong_dtype = b"a" * 16, b"b" * 16, b"c" * 16
    store.put(good, np.ones((4, 8, 2, 16), np.float32))
    store.put(wrong_shape, np.ones((4, 8, 2, 8), np.float32))
    store.put(wrong_dtype, np.ones((4, 8, 2, 16), np.float16))
    assert store.flush() == 3
    assert store.get(good) is not None
    assert store.get(wrong_shape) is None and store.get(wrong_dtype) is None
    assert store.misses == 2 and not store.holds(wrong_shape) and store.holds(good)


def test_persist_counts_what_the_store_holds(tiny_ckpt, tmp_path):
    config = dataclasses.replace(TINY, host_kv_bytes=8 * 2 * 2 * 4 * 2 * 8 * 4, kv_store=str(tmp_path / "kv"))
    engine = Engine(tiny_ckpt, config)
    prompts = shared_prefix_prompts(5)
    engine.generate(prompts, SamplingParams(max_tokens=8, ignore_eos=True))
    cached = engine.kv.num_cached + engine.stats()["pages_host"]
    assert cached > 8  # more than the host tier holds: some go straight to the store
    assert engine.persist_prefix_cache() == len(list((tmp_path / "kv" / "kv").iterdir())) == cached


def test_two_requests_sharing_a_store_prefix_in_one_step(tiny_ckpt, expected, tmp_path):
    """The second finds the pages the first is copying in this step not findable yet: it computes
    them (it used to copy the same store page twice, and the second copy found nothing)."""
    prompts, want = expected
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    writer = store_engine(tiny_ckpt, tmp_path / "kv")
    run_one(writer, prompts[0], params)
    writer.evict_prefix_cache()
    reader = store_engine(tiny_ckpt, tmp_path / "kv")
    out = reader.generate([prompts[1], prompts[2]], params)  # admitted in the same step
    assert [list(c.token_ids) for c in out] == want[1:3]
    assert reader.stats()["store_hit_pages"] == 9 and reader.failed is None


def test_a_cached_page_reused_as_a_copy_target_is_offloaded_first(tiny_ckpt):
    """When a prefix comes back from the host and the only pages left are other cached ones, those
    are evicted to make room: their contents go to the host before the copy overwrites them."""
    engine = Engine(tiny_ckpt, dataclasses.replace(TINY, host_kv_bytes=2**20))
    rng = np.random.default_rng(6)
    back, *others = [rng.integers(0, 260, 17).tolist() for _ in range(3)]
    params = SamplingParams(max_tokens=1)
    engine.generate([back], params)
    engine.evict_prefix_cache()  # `back`'s 4 full pages now live on the host only
    engine.generate(others, params)  # 8 cached pages on the device
    others_hashes = set(engine.kv.cached_hashes())
    # every never-cached free page taken: only the cached ones are left to grow into
    hog = engine.kv.blocks.grow([], (engine.kv.num_free - engine.kv.num_cached) * TINY.page_size)
    assert hog is not None
    assert run_one(engine, back, SamplingParams(max_tokens=4, ignore_eos=True)) == \
        (greedy_reference(tiny_ckpt, back, 4), 16)  # copied in from the host
    evicted = others_hashes - set(engine.kv.cached_hashes())
    assert evicted and evicted <= {h for h, _ in engine.host_tier.host.items()}
    engine.kv.blocks.release(hog)


def test_stored_events_name_each_page_by_its_parent_and_tokens(tiny_ckpt):
    """What a KV-aware router needs to follow a prefix: per page, the page before it and its tokens."""
    engine = Engine(tiny_ckpt, EngineConfig(page_size=4, max_seq_len=64, max_num_seqs=2, enable_prefix_caching=True,
                                            kv_cache_bytes=2**20))
    prompt = list(range(10, 23))  # 13 tokens: 3 full pages
    engine.generate([prompt], SamplingParams(max_tokens=1, ignore_eos=True))
    stored = [e for e in engine.drain_kv_events() if e.kind == "stored"]
    assert [e.tokens for e in stored[:3]] == [tuple(prompt[0:4]), tuple(prompt[4:8]), tuple(prompt[8:12])]
    assert [e.parent for e in stored[:3]] == [None, stored[0].page_hash, stored[1].page_hash]
    assert all(e.tier == "device" and e.replica == 0 for e in stored)


def prefix_hashes(engine, prompt: list[int]) -> list[bytes]:
    """The names the store gives the full pages of `prompt` (TINY: 4 tokens a page)."""
    hashes, parent = [], engine.kv.salt
    for i in range(len(prompt) // 4):
        parent = chain_hash(parent, prompt[4 * i:4 * i + 4])
        hashes.append(parent)
    return hashes


def test_a_store_filled_past_its_capacity_stays_within_it_and_keeps_the_recent_prefixes(tiny_ckpt, tmp_path):
    """40 pages' worth of capacity, 12 prompts of 9 full pages each written through it (108 pages):
    the folder never holds more than the capacity (± one page), the least recently used pages go
    first, and the latest prompts still hit — in this engine and in one restarted on the store."""
    from meshserve.runtime.kv_cache import page_bytes
    from meshserve.runtime.kv_tiers import StoreTier

    folder = tmp_path / "kv"
    value = StoreTier.header_bytes(4) + page_bytes(tiny_ckpt.config, 4, tiny_ckpt.dtype)  # one stored page
    config = dataclasses.replace(TINY, host_kv_bytes=0, kv_store=str(folder), kv_store_bytes=40 * value)
    engine = Engine(tiny_ckpt, config)
    params = SamplingParams(max_tokens=2, ignore_eos=True)
    rng = np.random.default_rng(12)
    prompts = [rng.integers(0, 260, 37).tolist() for _ in range(12)]

    def on_disk() -> int:
        return sum(f.stat().st_size for f in (folder / "kv").iterdir())

    store = engine.host_tier.store
    for i, prompt in enumerate(prompts):
        engine.generate([prompt], params)
        engine.evict_prefix_cache()
        if i == 3:  # 36 pages stored; the first prompt read back: now more recent than prompts 1–3
            assert run_one(engine, prompts[0][:36] + [1], params)[1] == 36
            engine.evict_prefix_cache()
        if i == 4:  # 45 pages written: 5 evicted, of the least recently used prompt (1), not of prompt 0
            assert all(store.holds(h) for h in prefix_hashes(engine, prompts[0]))
            assert sum(store.holds(h) for h in prefix_hashes(engine, prompts[1])) == 4
        assert on_disk() <= 40 * value + value, (i, on_disk())
    assert len(store) == 40 and store.evicted == 12 * 9 - 40 and on_disk() == 40 * value
    held = {h.hex() for h in prefix_hashes(engine, prompts[-1]) + prefix_hashes(engine, prompts[-2])}
    assert held <= {f.name for f in (folder / "kv").iterdir()}
    restarted = Engine(tiny_ckpt, config)
    assert run_one(restarted, prompts[-1][:36] + [2], params)[1] == 36
    assert restarted.stats()["store_hit_pages"] == 9
    small = Engine(tiny_ckpt, dataclasses.replace(config, kv_store_bytes=20 * value))  # capacity lowered
    assert len(small.host_tier.store) == 20 and on_disk() == 20 * value


def test_persist_replaces_every_damaged_page_of_a_prompt(tiny_ckpt, expected, tmp_path, caplog):
    """Three damaged pages of one prompt's nine: the first fails its checksum, so the request
    computes the prompt; persisting at shutdown verifies every page it holds and rewrites all
    three (not only the one that was read), so a restart hits the whole prefix again. The misses
    are counted and logged, one line per interval."""
    prompts, want = expected
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    config = dataclasses.replace(TINY, host_kv_bytes=2**20, kv_store=str(tmp_path / "kv"))
    engine = Engine(tiny_ckpt, config)
    run_one(engine, prompts[0], params)
    assert engine.persist_prefix_cache() >= 9
    files = [tmp_path / "kv" / "kv" / h.hex() for h in prefix_hashes(engine, prompts[0])[:9]]
    for f in (files[0], files[3], files[6]):
        data = bytearray(f.read_bytes())
        data[-7] ^= 0x5A
        f.write_bytes(bytes(data))
    damaged = Engine(tiny_ckpt, config)
    with caplog.at_level("WARNING", logger="meshserve.kv"):
        assert run_one(damaged, prompts[1], params) == (want[1], 0)
        assert damaged.stats()["store_misses"] == 1
        damaged.host_tier.store.get(prefix_hashes(damaged, prompts[0])[3])  # a second miss, within the minute
    assert damaged.stats()["store_misses"] == 2
    lines = [r.getMessage() for r in caplog.records if "could not be read" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("KV store: 1 page(s)"), lines
    assert damaged.persist_prefix_cache() >= 9
    # written: the three damaged, and the three full pages past the shared prefix of prompts[1]'s
    # 50 tokens (42 of prompt, 8 generated), which the store never had
    assert damaged.host_tier.store.rewritten == 6
    restarted = Engine(tiny_ckpt, config)
    assert run_one(restarted, prompts[2], params) == (want[2], 36)
    assert restarted.stats()["store_misses"] == 0


def test_a_page_another_server_wrote_after_this_one_opened_is_read(tmp_path):
    """The store's index is read at open; a page another process wrote since is still found (and
    then counts against this one's capacity)."""
    from meshserve.runtime.kv_tiers import StoreTier

    shape = (4, 8, 2, 16)
    reader = StoreTier(str(tmp_path / "kv"), shape, np.float32, capacity_bytes=10**6)
    writer = StoreTier(str(tmp_path / "kv"), shape, np.float32)
    writer.put(b"p" * 16, np.full(shape, 3.0, np.float32))
    assert writer.flush() == 1 and not reader.holds(b"p" * 16)
    assert np.array_equal(reader.get(b"p" * 16), np.full(shape, 3.0, np.float32))
    assert reader.holds(b"p" * 16) and len(reader) == 1 and reader.misses == 0
