"""Pallas kernels against the plain-jnp references: fresh random inputs per check, kernel outputs
poisoned with NaN first so every element must be written. Interpreted on CPU; compiled for real on a
GPU (`JAX_PLATFORMS=cuda pytest tests/runtime/kernels`, as benchmarks/gpu_suite.sh runs them)."""

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from meshserve.runtime.kernels.paged_decode import paged_decode
from meshserve.runtime.kernels.ragged_prefill import ragged_prefill
from meshserve.runtime.kernels.reference import paged_decode_reference, ragged_prefill_reference

INTERPRET = jax.default_backend() != "gpu"
# float32 on a GPU: the same IEEE products, summed in another order
TOL = {jnp.float32: 1e-5 if INTERPRET else 1e-4, jnp.bfloat16: 1e-2}


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


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("q_heads,kv_heads,head_dim", [(4, 4, 64), (8, 2, 128), (8, 1, 64)],
                         ids=["gqa1-d64", "gqa4-d128", "gqa8-d64"])
@pytest.mark.parametrize("num_splits,pages_per_block", [(1, 1), (3, 1), (1, 4), (3, 2)])
def test_paged_decode(dtype, q_heads, kv_heads, head_dim, num_splits, pages_per_block):
    rng = np.random.default_rng(seed_of("decode", dtype, q_heads, head_dim, num_splits, pages_per_block))
    page_size, width = 8, 7
    lengths = np.array([1, 13, 56, 8, 33])  # a one-token sequence, non-multiples of the page, a full table
    k_pages, v_pages = _pool(rng, 40, page_size, kv_heads, head_dim, dtype)
    tables = _tables(rng, lengths, page_size, width, 40)
    q = jnp.asarray(rng.standard_normal((len(lengths), q_heads, head_dim)), dtype)
    lengths = jnp.asarray(lengths, jnp.int32)
    out = paged_decode(q, k_pages, v_pages, tables, lengths, num_splits=num_splits,
                       pages_per_block=pages_per_block, interpret=INTERPRET, poison=True)
    ref = paged_decode_reference(q.astype(jnp.float32), k_pages.astype(jnp.float32),
                                 v_pages.astype(jnp.float32), tables, lengths)
    assert _rel(out, ref) <= TOL[dtype]


def test_paged_decode_sliding_window():
    rng = np.random.default_rng(5)
    k_pages, v_pages = _pool(rng, 20, 4, 2, 64, jnp.float32)
    lengths = np.array([3, 30, 17])
    tables = _tables(rng, lengths, 4, 8, 20)
    q = jnp.asarray(rng.standard_normal((3, 4, 64)), jnp.float32)
    out = paged_decode(q, k_pages, v_pages, tables, jnp.asarray(lengths), num_splits=2, sliding_window=6,
                       interpret=INTERPRET, poison=True)
    ref = paged_decode_reference(q, k_pages, v_pages, tables, jnp.asarray(lengths), sliding_window=6)
    assert _rel(out, ref) <= 1e-5


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("q_heads,kv_heads,head_dim", [(2, 2, 64), (8, 2, 128), (8, 1, 64)],
                         ids=["gqa1-d64", "gqa4-d128", "gqa8-d64"])
@pytest.mark.parametrize("pages_per_block", [1, 3])
def test_ragged_prefill(dtype, q_heads, kv_heads, head_dim, pages_per_block):
    rng = np.random.default_rng(seed_of("prefill", dtype, q_heads, head_dim, pages_per_block))
    page_size, width, T = 8, 8, 20  # T not a multiple of the query block
    q_start = np.array([0, 11, 30, 5])  # fresh prompt, and chunks with a causal offset
    q_len = np.array([20, 1, 13, 17])  # ragged, including a one-token row
    lengths = q_start + q_len
    k_pages, v_pages = _pool(rng, 40, page_size, kv_heads, head_dim, dtype)
    tables = _tables(rng, lengths, page_size, width, 40)
    q = jnp.asarray(rng.standard_normal((4, T, q_heads, head_dim)), dtype)
    args = (tables, jnp.asarray(q_start, jnp.int32), jnp.asarray(q_len, jnp.int32))
    out = ragged_prefill(q, k_pages, v_pages, *args, block_q=8, pages_per_block=pages_per_block,
                         interpret=INTERPRET, poison=True)
    ref = ragged_prefill_reference(q.astype(jnp.float32), k_pages.astype(jnp.float32),
                                   v_pages.astype(jnp.float32), *args)
    assert _rel(out, ref) <= TOL[dtype]
    assert not np.asarray(out, np.float32)[1, 1:].any()  # padding rows are zeros


def test_ragged_prefill_sliding_window():
    rng = np.random.default_rng(9)
    k_pages, v_pages = _pool(rng, 24, 4, 2, 64, jnp.float32)
    q_start, q_len = np.array([0, 9]), np.array([16, 12])
    tables = _tables(rng, q_start + q_len, 4, 8, 24)
    q = jnp.asarray(rng.standard_normal((2, 16, 4, 64)), jnp.float32)
    args = (tables, jnp.asarray(q_start), jnp.asarray(q_len))
    out = ragged_prefill(q, k_pages, v_pages, *args, block_q=4, sliding_window=5, interpret=INTERPRET, poison=True)
    ref = ragged_prefill_reference(q, k_pages, v_pages, *args, sliding_window=5)
    assert _rel(out, ref) <= 1e-5


def test_reference_agrees_with_the_model_attention():
    """The kernel reference and the model's dense attention are the same function of positions."""
    from meshserve.models.llama import attention

    rng = np.random.default_rng(2)
    k_pages, v_pages = _pool(rng, 10, 4, 2, 8, jnp.float32)
    tables = jnp.asarray([[3, 1, 7, 2]], jnp.int32)
    q = jnp.asarray(rng.standard_normal((1, 5, 4, 8)), jnp.float32)
    ref = ragged_prefill_reference(q, k_pages, v_pages, tables, jnp.asarray([6]), jnp.asarray([5]))
    keys = k_pages[tables].reshape(1, 16, 2, 8)
    values = v_pages[tables].reshape(1, 16, 2, 8)
    dense = attention(q, keys, values, jnp.arange(6, 11)[None], jnp.arange(16)[None])
    np.testing.assert_allclose(ref, dense, rtol=1e-5, atol=1e-6)
