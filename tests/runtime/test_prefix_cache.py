"""Prefix caching: page bookkeeping, and the engine's outputs with and without it."""

import dataclasses

import numpy as np
import pytest

from runtime.block_manager import BlockManager, chain_hash
from runtime.engine import Engine, EngineConfig
from runtime.sampling import SamplingParams
from tests.runtime.conftest import greedy_reference


def test_chain_hash_names_the_whole_prefix():
    a = chain_hash(b"salt", [1, 2, 3, 4])
    assert a == chain_hash(b"salt", [1, 2, 3, 4])
    assert a != chain_hash(b"other", [1, 2, 3, 4]) and a != chain_hash(b"salt", [1, 2, 3, 5])
    assert chain_hash(a, [5, 6]) != chain_hash(chain_hash(b"salt", [9, 9, 9, 9]), [5, 6])


def test_cached_pages_wait_on_an_lru_and_are_evicted_oldest_first():
    bm = BlockManager(5, 4, prefix_caching=True)  # 4 usable pages
    a, b = [], []
    assert bm.grow(a, 8) and bm.grow(b, 8)
    ha = [chain_hash(b"salt", [0, 1, 2, 3])]
    ha.append(chain_hash(ha[0], [4, 5, 6, 7]))
    for page, h in zip(a, ha):
        bm.register(page, h)
    assert bm.lookup(ha) == a and bm.lookup([chain_hash(b"salt", [9, 9, 9, 9])] + ha[1:]) == []
    pages_a = list(a)
    bm.release(a)  # empties `a`
    assert bm.num_free == 2 and bm.num_cached == 2  # unreferenced, still cached
    c = bm.lookup(ha)
    bm.share(c)  # reuse: back in use, off the LRU
    assert c == pages_a and all(bm.ref_count(p) == 1 for p in c) and bm.num_free == 0
    bm.release(c)
    d = []
    assert bm.grow(d, 4)  # no never-cached page is free: evicts the LRU's oldest, the chain's tail
    assert bm.lookup(ha) == [pages_a[0]] and bm.evictions == 1
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
    assert cached.blocks.num_free == cached.blocks.num_usable  # cached pages count as free
    assert plain.stats()["prefix_hit_tokens"] == 0


def test_eviction_under_pressure_keeps_outputs_right(tiny_ckpt):
    small = dataclasses.replace(TINY, kv_cache_bytes=16 * 2 * 2 * 4 * 2 * 8 * 4)  # 15 usable pages
    engine = Engine(tiny_ckpt, small)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, 260, n).tolist() for n in (20, 23, 17, 30)] * 2
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    out = engine.generate(prompts, params)
    for p, c in zip(prompts, out):
        assert list(c.token_ids) == greedy_reference(tiny_ckpt, p, 8)
    assert engine.blocks.evictions > 0 and engine.blocks.num_free == engine.blocks.num_usable
