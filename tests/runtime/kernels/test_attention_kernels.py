"""Pallas kernels against the plain-jnp references: fresh random inputs per check, kernel outputs
poisoned with NaN first so every element must be written. Interpreted on CPU; compiled for real on a
GPU (`JAX_PLATFORMS=cuda pytest tests/runtime/kernels`, as benchmarks/gpu_suite.sh runs them); and
built for H100 and H200 targets without one (benchmarks/gpu_build.py builds every call `kernel_calls`
lists, which are these tests' own)."""

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from meshserve.runtime import kv_quant
from meshserve.runtime.kernels.paged_decode import paged_decode
from meshserve.runtime.kernels.ragged_prefill import ragged_prefill
from meshserve.runtime.kernels.reference import paged_decode_reference, ragged_prefill_reference

INTERPRET = jax.default_backend() != "gpu"
# float32 on a GPU: the same IEEE products, summed in another order
TOL = {jnp.float32: 1e-5 if INTERPRET else 1e-4, jnp.bfloat16: 1e-2}

DTYPES = pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
# (q heads, kv heads, head_dim): G = 1, 4, 8 and 3 (SmolLM2's: not a power of two) query heads per kv head
HEADS = [(4, 4, 64), (8, 2, 128), (8, 1, 64), (9, 3, 64)]
HEAD_IDS = ["gqa1-d64", "gqa4-d128", "gqa8-d64", "gqa3-d64"]
DECODE_SETTINGS = [(1, 1), (3, 1), (1, 4), (3, 2)]  # (splits, pages per block)
# (pages per block, page-table width): 3 pages per block, and a table narrower than a tile
PREFILL_SETTINGS = [(1, 8), (3, 8), (4, 3)]
PREFILL_IDS = ["ppb1", "ppb3", "narrow-table"]


def seed_of(*case) -> int:
    """A seed fixed by the test case, the same in every run (Python's hash() of a str is not), so a
    failure can be replayed."""
    return zlib.crc32(" ".join(map(str, case)).encode())


def _rel(out, ref):
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    assert np.isfinite(out).all()
    return np.linalg.norm(out - ref) / np.linalg.norm(ref)


def _pool(rng, pages, page_size, kv_heads, head_dim, dtype):
    shape = (pages, page_size, kv_heads, head_dim)
    return (jnp.asarray(rng.standard_normal(shape), dtype), jnp.asarray(rng.standard_normal(shape), dtype))


def _tables(rng, lengths, page_size, width, pages):
    """Permuted, non-overlapping page tables (page 0 is the null page, used as padding)."""
    free = rng.permutation(np.arange(1, pages))
    tables = np.zeros((len(lengths), width), np.int32)
    for b, n in enumerate(lengths):
        need = -(-n // page_size)
        tables[b, :need], free = free[:need], free[need:]
    return jnp.asarray(tables)


def decode_inputs(rng, dtype, q_heads, kv_heads, head_dim):
    """(q, k_pages, v_pages, tables, lengths): a one-token sequence, lengths not multiples of the
    page, a full table."""
    page_size, width = 8, 7
    lengths = np.array([1, 13, 56, 8, 33])
    k_pages, v_pages = _pool(rng, 40, page_size, kv_heads, head_dim, dtype)
    tables = _tables(rng, lengths, page_size, width, 40)
    q = jnp.asarray(rng.standard_normal((len(lengths), q_heads, head_dim)), dtype)
    return q, k_pages, v_pages, tables, jnp.asarray(lengths, jnp.int32)


@DTYPES
@pytest.mark.parametrize("q_heads,kv_heads,head_dim", HEADS, ids=HEAD_IDS)
@pytest.mark.parametrize("num_splits,pages_per_block", DECODE_SETTINGS)
def test_paged_decode(dtype, q_heads, kv_heads, head_dim, num_splits, pages_per_block):
    rng = np.random.default_rng(seed_of("decode", dtype, q_heads, head_dim, num_splits, pages_per_block))
    q, k_pages, v_pages, tables, lengths = decode_inputs(rng, dtype, q_heads, kv_heads, head_dim)
    out = paged_decode(q, k_pages, v_pages, tables, lengths, num_splits=num_splits,
                       pages_per_block=pages_per_block, interpret=INTERPRET, poison=True)
    ref = paged_decode_reference(q.astype(jnp.float32), k_pages.astype(jnp.float32),
                                 v_pages.astype(jnp.float32), tables, lengths)
    assert _rel(out, ref) <= TOL[dtype]


def decode_window_inputs(rng):
    k_pages, v_pages = _pool(rng, 20, 4, 2, 64, jnp.float32)
    lengths = np.array([3, 30, 17])
    tables = _tables(rng, lengths, 4, 8, 20)
    q = jnp.asarray(rng.standard_normal((3, 4, 64)), jnp.float32)
    return q, k_pages, v_pages, tables, jnp.asarray(lengths, jnp.int32)


def test_paged_decode_sliding_window():
    args = decode_window_inputs(np.random.default_rng(5))
    out = paged_decode(*args, num_splits=2, sliding_window=6, interpret=INTERPRET, poison=True)
    ref = paged_decode_reference(*args, sliding_window=6)
    assert _rel(out, ref) <= 1e-5


def _packed(q_rows, q_len, gap=0):
    """Padded rows [B, T, H, E] → their chunks packed on one token axis (with `gap` unused tokens
    after each) and each chunk's first token."""
    chunks, first, at = [], [], 0
    for b, n in enumerate(q_len):
        chunks += [q_rows[b, :n], jnp.zeros((gap, *q_rows.shape[2:]), q_rows.dtype)]
        first.append(at)
        at += n + gap
    return jnp.concatenate(chunks), jnp.asarray(first, jnp.int32)


def _unpacked(out, first, q_len, T):
    return jnp.stack([jnp.pad(out[f:f + n], ((0, T - n), (0, 0), (0, 0))) for f, n in zip(first, q_len)])


def prefill_inputs(rng, dtype, q_heads, kv_heads, head_dim, width):
    """(q rows [4, 20, H, E], k_pages, v_pages, tables, q_start, q_len): a fresh prompt and chunks
    with a causal offset, ragged (a one-token chunk; with a narrow table, an empty one), 20 tokens a
    row: not a multiple of the query block."""
    page_size, T = 8, 20
    q_start = np.array([0, 11, 30, 5]) * width // 8
    q_len = np.array([20, 1, 13, 17]) * width // 8
    k_pages, v_pages = _pool(rng, 40, page_size, kv_heads, head_dim, dtype)
    tables = _tables(rng, q_start + q_len, page_size, width, 40)
    q = jnp.asarray(rng.standard_normal((4, T, q_heads, head_dim)), dtype)
    return q, k_pages, v_pages, tables, jnp.asarray(q_start, jnp.int32), jnp.asarray(q_len, jnp.int32)


def prefill_gaps(dtype, group: int):
    """Chunks packed one after another; and (float32, G = 1 and 3) with unused tokens between them."""
    return (0, 5) if dtype == jnp.float32 and group in (1, 3) else (0,)


@DTYPES
@pytest.mark.parametrize("q_heads,kv_heads,head_dim", HEADS, ids=HEAD_IDS)
@pytest.mark.parametrize("pages_per_block,width", PREFILL_SETTINGS, ids=PREFILL_IDS)
def test_ragged_prefill(dtype, q_heads, kv_heads, head_dim, pages_per_block, width):
    """Packed chunks against the reference on padded rows. G = 3 query heads per kv head, 3 pages
    per block and a page table narrower than a tile are what a GPU build needs powers of two for."""
    rng = np.random.default_rng(seed_of("prefill", dtype, q_heads, head_dim, pages_per_block, width))
    q, k_pages, v_pages, tables, q_start, q_len = prefill_inputs(rng, dtype, q_heads, kv_heads, head_dim, width)
    ref = ragged_prefill_reference(q.astype(jnp.float32), k_pages.astype(jnp.float32), v_pages.astype(jnp.float32),
                                   tables, q_start, q_len)
    for gap in prefill_gaps(dtype, q_heads // kv_heads):
        packed, first = _packed(q, q_len, gap)
        out = ragged_prefill(packed, k_pages, v_pages, tables, first, q_start, q_len, block_q=8,
                             pages_per_block=pages_per_block, interpret=INTERPRET, poison=True)
        assert _rel(_unpacked(out, first, q_len, q.shape[1]), ref) <= TOL[dtype]
        in_chunk = np.zeros(len(packed), bool)
        for f, n in zip(np.asarray(first), np.asarray(q_len)):
            in_chunk[f:f + n] = True
        assert not np.asarray(out, np.float32)[~in_chunk].any()  # tokens in no chunk are zeros


def prefill_window_inputs(rng):
    k_pages, v_pages = _pool(rng, 24, 4, 2, 64, jnp.float32)
    q_start, q_len = np.array([0, 9]), np.array([16, 12])
    tables = _tables(rng, q_start + q_len, 4, 8, 24)
    q = jnp.asarray(rng.standard_normal((2, 16, 4, 64)), jnp.float32)
    return q, k_pages, v_pages, tables, jnp.asarray(q_start, jnp.int32), jnp.asarray(q_len, jnp.int32)


def test_ragged_prefill_sliding_window():
    q, k_pages, v_pages, tables, q_start, q_len = prefill_window_inputs(np.random.default_rng(9))
    packed, first = _packed(q, q_len)
    out = ragged_prefill(packed, k_pages, v_pages, tables, first, q_start, q_len, block_q=4, sliding_window=5,
                         interpret=INTERPRET, poison=True)
    ref = ragged_prefill_reference(q, k_pages, v_pages, tables, q_start, q_len, sliding_window=5)
    assert _rel(_unpacked(out, first, q_len, 16), ref) <= 1e-5


KV_DTYPES = pytest.mark.parametrize("kv_dtype", [jnp.int8, jnp.float8_e4m3fn], ids=["int8", "fp8"])
QUANT_HEADS = pytest.mark.parametrize("q_heads,kv_heads,head_dim", HEADS[2:], ids=HEAD_IDS[2:])


def _quantized(k_pages, v_pages, kv_dtype):
    """A quantized pool's (k, v, k_exp, v_exp) for float pages (runtime/kv_quant.py)."""
    (kc, ke), (vc, ve) = kv_quant.quantize(k_pages * 4, kv_dtype), kv_quant.quantize(v_pages * 4, kv_dtype)
    return kc, vc, ke, ve


@DTYPES
@KV_DTYPES
@QUANT_HEADS
def test_paged_decode_reads_a_quantized_pool(dtype, kv_dtype, q_heads, kv_heads, head_dim):
    """int8 / fp8 codes with their scale exponents: the kernel equals the reference over the
    dequantized pool, to the tolerance of a float pool (both dequantize the same way)."""
    rng = np.random.default_rng(seed_of("decode-q", dtype, kv_dtype, q_heads, head_dim))
    q, k_pages, v_pages, tables, lengths = decode_inputs(rng, dtype, q_heads, kv_heads, head_dim)
    kc, vc, ke, ve = _quantized(k_pages, v_pages, kv_dtype)
    out = paged_decode(q, kc, vc, tables, lengths, ke, ve, num_splits=2, pages_per_block=2, interpret=INTERPRET,
                       poison=True)
    ref = paged_decode_reference(q.astype(jnp.float32), kc, vc, tables, lengths, k_exp=ke, v_exp=ve)
    assert _rel(out, ref) <= TOL[dtype]


@DTYPES
@KV_DTYPES
@QUANT_HEADS
def test_ragged_prefill_reads_a_quantized_pool(dtype, kv_dtype, q_heads, kv_heads, head_dim):
    rng = np.random.default_rng(seed_of("prefill-q", dtype, kv_dtype, q_heads, head_dim))
    q, k_pages, v_pages, tables, q_start, q_len = prefill_inputs(rng, dtype, q_heads, kv_heads, head_dim, 8)
    kc, vc, ke, ve = _quantized(k_pages, v_pages, kv_dtype)
    ref = ragged_prefill_reference(q.astype(jnp.float32), kc, vc, tables, q_start, q_len, k_exp=ke, v_exp=ve)
    packed, first = _packed(q, q_len)
    out = ragged_prefill(packed, kc, vc, tables, first, q_start, q_len, ke, ve, block_q=8, pages_per_block=2,
                         interpret=INTERPRET, poison=True)
    assert _rel(_unpacked(out, first, q_len, q.shape[1]), ref) <= TOL[dtype]


def test_block_list_cuts_every_chunk_and_nothing_else():
    from meshserve.runtime.kernels.ragged_prefill import block_list

    first, start, length = (jnp.asarray(a, jnp.int32) for a in ([0, 20, 21, 34], [0, 11, 30, 5], [20, 1, 0, 13]))
    seq, tok, n, pos = (np.asarray(a).tolist() for a in block_list(first, start, length, 8, 9))
    assert seq == [0, 0, 0, 1, 3, 3, 3, 3, 3]  # the empty chunk 2 has no block; the tail is empty blocks
    assert tok[:6] == [0, 8, 16, 20, 34, 42] and n == [8, 8, 4, 1, 8, 5, 0, 0, 0]
    assert pos[:6] == [0, 8, 16, 11, 5, 13]


def test_reference_agrees_with_the_model_attention():
    """The kernel reference and the model's dense attention are the same function of positions."""
    from meshserve.models.decoder import attention

    rng = np.random.default_rng(2)
    k_pages, v_pages = _pool(rng, 10, 4, 2, 8, jnp.float32)
    tables = jnp.asarray([[3, 1, 7, 2]], jnp.int32)
    q = jnp.asarray(rng.standard_normal((1, 5, 4, 8)), jnp.float32)
    ref = ragged_prefill_reference(q, k_pages, v_pages, tables, jnp.asarray([6]), jnp.asarray([5]))
    keys = k_pages[tables].reshape(1, 16, 2, 8)
    values = v_pages[tables].reshape(1, 16, 2, 8)
    dense = attention(q, keys, values, jnp.arange(6, 11)[None], jnp.arange(16)[None])
    np.testing.assert_allclose(ref, dense, rtol=1e-5, atol=1e-6)


def kernel_calls():
    """(name, kernel, [(shape, dtype) of each array argument], keyword arguments) of every kernel
    call the tests above make, for building them for a GPU target (benchmarks/gpu_build.py)."""
    spec = lambda arrays: [(a.shape, a.dtype) for a in arrays]
    rng = np.random.default_rng(0)
    for dtype, dname in ((jnp.float32, "f32"), (jnp.bfloat16, "bf16")):
        for (h, k, e), hid in zip(HEADS, HEAD_IDS):
            args = decode_inputs(rng, dtype, h, k, e)
            for splits, ppb in DECODE_SETTINGS:
                yield (f"paged_decode {dname} {hid} splits={splits} ppb={ppb}", paged_decode, spec(args),
                       dict(num_splits=splits, pages_per_block=ppb, poison=True))
            for (ppb, width), pid in zip(PREFILL_SETTINGS, PREFILL_IDS):
                q, *rest = prefill_inputs(rng, dtype, h, k, e, width)
                for gap in prefill_gaps(dtype, h // k):
                    packed, first = _packed(q, rest[-1], gap)
                    yield (f"ragged_prefill {dname} {hid} {pid} gap={gap}", ragged_prefill,
                           spec([packed, *rest[:3], first, *rest[3:]]),
                           dict(block_q=8, pages_per_block=ppb, poison=True))
    for kv_dtype, kname in ((jnp.int8, "int8"), (jnp.float8_e4m3fn, "fp8")):  # quantized pools, bf16 queries
        q, k_pages, v_pages, tables, lengths = decode_inputs(rng, jnp.bfloat16, 8, 1, 64)
        kc, vc, ke, ve = _quantized(k_pages, v_pages, kv_dtype)
        yield (f"paged_decode bf16 {kname} cache", paged_decode, spec([q, kc, vc, tables, lengths, ke, ve]),
               dict(num_splits=2, pages_per_block=2, poison=True))
        q, k_pages, v_pages, tables, q_start, q_len = prefill_inputs(rng, jnp.bfloat16, 9, 3, 64, 8)
        kc, vc, ke, ve = _quantized(k_pages, v_pages, kv_dtype)
        packed, first = _packed(q, q_len)
        yield (f"ragged_prefill bf16 {kname} cache", ragged_prefill,
               spec([packed, kc, vc, tables, first, q_start, q_len, ke, ve]),
               dict(block_q=8, pages_per_block=2, poison=True))
    yield ("paged_decode sliding window", paged_decode, spec(decode_window_inputs(rng)),
           dict(num_splits=2, sliding_window=6, poison=True))
    q, k_pages, v_pages, tables, q_start, q_len = prefill_window_inputs(rng)
    packed, first = _packed(q, q_len)
    yield ("ragged_prefill sliding window", ragged_prefill,
           spec([packed, k_pages, v_pages, tables, first, q_start, q_len]),
           dict(block_q=4, sliding_window=5, poison=True))
