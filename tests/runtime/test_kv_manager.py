"""The KV manager by hand: page tables, their names, reuse from the device and the lower tier's index,
the step's copies, import bookkeeping, pool sizing; and that nothing else writes a page table."""

import ast
from pathlib import Path

import pytest

from meshserve.models.errors import ConfigError
from meshserve.runtime.block_manager import chain_hash
from meshserve.runtime.kv_manager import KVManager, kv_pages
from meshserve.runtime.sequence import Sequence

ROOT = Path(__file__).resolve().parents[2]


def seq(rid, tokens):
    return Sequence(rid, list(tokens), len(tokens))


def names(tokens, salt=b"m", page_size=4):
    out, parent = [], salt
    for i in range(len(tokens) // page_size):
        parent = chain_hash(parent, tokens[i * page_size:(i + 1) * page_size])
        out.append(parent)
    return out


class Index:
    """A lower tier's index: the pages it holds, by name (no data, no reads)."""

    def __init__(self, hashes):
        self.hashes = set(hashes)

    def holds(self, h):
        return h in self.hashes


def test_allocate_and_free_write_the_table_all_or_nothing():
    kv = KVManager(5, 4)  # 4 usable pages
    a, b = seq("a", range(9)), seq("b", range(8))
    assert kv.allocate(a, 9) and len(a.pages) == 3
    table = a.pages
    assert not kv.allocate(b, 8) and b.pages == [] and kv.num_free == 1  # 2 needed, 1 free
    assert kv.allocate(a, 12) and a.pages == table  # still 3 pages
    kv.free(a)
    assert a.pages == [] and kv.num_free == 4 and kv.replica_of(a) is None


def test_full_pages_are_named_and_registered_at_commit_only():
    kv = KVManager(64, 4, prefix_caching=True, salt=b"m")
    tokens = list(range(10))
    a = seq("a", tokens)
    kv.allocate(a, 10)
    assert kv.num_cached == 0 and kv.held(tokens + [99]) == []
    kv.register(a, 10)  # the step ran: two full pages, named from the salt
    assert a.page_hashes == names(tokens) and a.num_registered == 2 and kv.num_cached == 2
    b = seq("b", tokens + [99])
    found, cost = kv.reuse_prefix(b, budget=64)
    assert (found, cost) == (8, 0) and b.pages == a.pages[:2] and b.num_registered == 2
    assert kv.describe()["prefix_hit_tokens"] == 8


def test_reuse_from_the_lower_tier_is_planned_from_its_index_and_costs_budget():
    tokens = list(range(33))  # 8 full pages, of which 7 may be reused (the last token is computed)
    kv = KVManager(64, 4, prefix_caching=True, salt=b"m", lower=Index(names(tokens)), onboard_page_cost=2)
    a = seq("a", tokens)
    found, cost = kv.reuse_prefix(a, budget=10)  # (n + 1) · 2 < 10: 4 pages fit the budget
    assert (found, cost) == (16, 8) and len(a.pages) == 4 and a.num_registered == 0
    onboard = kv.take_onboard()
    assert [(o.seq, o.index, o.page, o.page_hash) for o in onboard] == [
        (a, i, a.pages[i], names(tokens)[i]) for i in range(4)]
    b = seq("b", tokens)  # the same prefix in the same step: not findable until copied in
    found, cost = kv.reuse_prefix(b, budget=10)
    assert (found, cost) == (16, 8)
    kv.free(b)  # given back before the step: its planned copies go too
    assert kv.take_onboard() == () and kv.num_free == kv.num_usable - 4


def test_a_page_that_cannot_be_copied_in_loses_its_name_and_those_after_it():
    tokens = list(range(25))
    kv = KVManager(64, 4, prefix_caching=True, salt=b"m", lower=Index(names(tokens)))
    a = seq("a", tokens)
    kv.reuse_prefix(a, budget=100)
    assert len(a.page_hashes) == 6 and kv.lower_hits == 24
    kv.onboard_failed(a, 2)
    assert a.page_hashes == names(tokens)[:2] and len(a.pages) == 6 and kv.lower_hits == 8


def test_an_import_fills_only_the_pages_not_held_and_leaves_them_cached_unreferenced():
    kv = KVManager(64, 4, prefix_caching=True, salt=b"m")
    tokens = list(range(21))  # 5 reusable pages
    a = seq("a", tokens)
    kv.allocate(a, 8)
    kv.register(a, 8)  # pages 0 and 1 held
    kv.free(a)
    hashes = names(tokens)
    with pytest.raises(ValueError, match="not this prompt's"):
        kv.begin_import(tokens, 2, [b"x" * 16])
    with pytest.raises(ValueError, match="holds only the prompt's first 2"):
        kv.begin_import(tokens, 3, hashes[3:5])
    plan = kv.begin_import(tokens, 1, hashes[1:5])  # page 1 held already: written to the null page
    assert plan.targets[0] == kv.null_page(0) and len(set(plan.targets[1:])) == 3
    assert kv.finish_import(plan, written=True) == 3
    assert kv.held(tokens) == kv.held(tokens)[:5] and len(kv.held(tokens)) == 5
    assert kv.num_free == kv.num_usable  # all unreferenced: cached pages count as free
    assert kv.begin_import(tokens, 0, hashes) is None  # held already: nothing to write
    plan = kv.begin_import(tokens + list(range(21, 29)), 5, names(tokens + list(range(21, 29)))[5:7])
    assert kv.finish_import(plan, written=False) == 0 and len(kv.held(tokens + list(range(21, 29)))) == 5


def test_pool_sizing_refuses_a_pool_that_cannot_hold_one_request():
    assert kv_pages(page_bytes=1000, page_size=16, max_seq_len=64, replicas=2, budget=10_999) == 10
    with pytest.raises(ConfigError, match="fewer than max_seq_len"):
        kv_pages(page_bytes=1000, page_size=16, max_seq_len=128, replicas=2, budget=10_999)
    with pytest.raises(ConfigError, match="fewer than 2 pages"):
        kv_pages(page_bytes=1000, page_size=16, max_seq_len=16, replicas=1, budget=1999)


def _page_table_writes(path: Path) -> list[str]:
    """Lines that assign, extend or delete a `.pages` / `.page_hashes` / `.num_registered`."""
    tree, found = ast.parse(path.read_text()), []
    owned = {"pages", "page_hashes", "num_registered"}

    def is_owned(node):
        return isinstance(node, ast.Attribute) and node.attr in owned

    for node in ast.walk(tree):
        targets = []
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Delete)):
            targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else [node.target]
        for t in targets:
            for part in (t.elts if isinstance(t, ast.Tuple) else [t]):
                while isinstance(part, ast.Subscript):  # x.pages[i] = … writes x.pages too
                    part = part.value
                if is_owned(part):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and is_owned(node.func.value) \
                and node.func.attr in ("append", "extend", "clear", "pop", "insert", "remove", "sort"):
            found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return found


def test_only_the_kv_manager_writes_page_tables_and_their_names():
    writes = [w for folder in ("runtime", "serving") for f in sorted((ROOT / folder).rglob("*.py"))
              for w in _page_table_writes(f)]
    assert writes and all(w.startswith("runtime/kv_manager.py:") for w in writes), writes


# ---- the pool sized from memory (no kv_cache_bytes) ------------------------------------------------

def _llama3_8b():
    from meshserve.models.config import ModelConfig

    return ModelConfig.named("llama3-8b")


def test_llama3_8b_on_one_h100_gets_what_the_weights_leave():
    """Llama-3-8B in bfloat16 on an 80 GiB H100 at gpu_memory_utilization 0.9: the allocator's limit
    less the weights less the activation estimate, in 2 MiB pages of 16 tokens."""
    import numpy as np

    from meshserve.runtime.kv_cache import page_bytes
    from meshserve.runtime.kv_manager import Memory, activation_bytes, kv_budget

    model = _llama3_8b()
    weights = model.num_params() * 2
    assert weights == 16_060_522_496
    per_page = page_bytes(model, 16, np.dtype("bfloat16"))
    assert per_page == 2 << 20  # 128 KiB a token: 32 layers × 2 × 8 kv heads × 128 × 2 bytes
    limit = int(0.9 * 80 * 2**30)
    budget = kv_budget(Memory(limit, in_use=weights), model, per_page, 16, max_seq_len=8192, max_num_seqs=256,
                       max_num_batched_tokens=8192, replicas=1, split=1)
    assert activation_bytes(model, 8192) == 4 * (3 * 128256 + 8 * 4096 + 3 * 14336) * 8192 + (512 << 20)
    assert budget == limit - weights - activation_bytes(model, 8192)
    pages = kv_pages(per_page, 16, 8192, 1, budget)
    assert pages * 16 > 300_000  # tokens: ~37 requests of the full 8,192 context at once
    # over 8 devices with the kv heads split, each device's share is as large again
    split = kv_budget(Memory(limit, in_use=weights // 8), model, per_page, 16, max_seq_len=8192, max_num_seqs=256,
                      max_num_batched_tokens=8192, replicas=1, split=8)
    assert split == 8 * (limit - weights // 8 - activation_bytes(model, 8192))


def test_weights_that_leave_nothing_are_named():
    from meshserve.runtime.kv_manager import Memory, kv_budget

    model = _llama3_8b()
    with pytest.raises(ConfigError, match=r"no device memory left for the KV cache: 14\.96 GiB in use .* "
                                          r"raise gpu_memory_utilization"):
        kv_budget(Memory(16 * 2**30, in_use=model.num_params() * 2), model, 2 << 20, 16, max_seq_len=8192,
                  max_num_seqs=16, max_num_batched_tokens=512, replicas=1, split=1)


def test_a_cpu_pool_holds_max_num_seqs_requests_within_a_quarter_of_the_host():
    from meshserve.runtime.kv_manager import Memory, kv_budget

    model = _llama3_8b()
    page = 2 << 20
    need = 4 * (2048 // 16 + 1) * page + page
    args = dict(max_seq_len=2048, max_num_seqs=4, max_num_batched_tokens=512, replicas=1, split=1)
    assert kv_budget(Memory(None, host_available=64 << 30), model, page, 16, **args) == need
    assert kv_budget(Memory(None, host_available=4 << 30), model, page, 16, **args) == 1 << 30  # a quarter
    # never less than one max_seq_len request per replica, however little is free
    assert kv_budget(Memory(None, host_available=1 << 20), model, page, 16, **args) == (2048 // 16 + 1) * page
    assert kv_budget(Memory(None), model, page, 16, **args) == need


def test_an_8b_shaped_engine_sizes_its_pool_from_the_memory_it_is_given(tiny_ckpt):
    """The Llama-3-8B shapes (2 of its 32 layers, its whole vocabulary), bfloat16, no kv_cache_bytes and
    no YAML: the engine's pool is what the injected device memory leaves, and it serves a request."""
    import dataclasses

    import jax
    import jax.numpy as jnp
    import numpy as np

    from meshserve.models.checkpoint import Checkpoint
    from meshserve.models.decoder import abstract_params
    from meshserve.runtime.engine import Engine, EngineConfig
    from meshserve.runtime.kv_cache import page_bytes
    from meshserve.runtime.kv_manager import Memory, activation_bytes
    from meshserve.runtime.sampling import SamplingParams

    model = dataclasses.replace(_llama3_8b(), num_layers=2)
    dtype = np.dtype(jnp.bfloat16)
    params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), abstract_params(model, dtype))
    ckpt = Checkpoint(None, model, tiny_ckpt.tokenizer, dtype, params)  # token ids only: any tokenizer
    config = EngineConfig(max_seq_len=8192, max_num_seqs=2, max_num_batched_tokens=256, max_prefill_chunk=256,
                          prefill_buckets=(256,), decode_buckets=(2,), enable_prefix_caching=False,
                          async_scheduling=False)
    assert config.kv_cache_bytes is None  # the default: sized from memory
    weights = model.num_params() * 2
    pool = 256 << 20
    memory = Memory(weights + activation_bytes(model, 256) + pool, in_use=weights)
    engine = Engine(ckpt, config, memory=memory)
    assert engine.kv.blocks.num_pages == pool // page_bytes(model, 16, dtype) == 2048
    [out] = engine.generate([[1, 2, 3]], SamplingParams(max_tokens=2, ignore_eos=True))
    assert len(out.token_ids) == 2
