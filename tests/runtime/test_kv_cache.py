"""The engine's jnp attention over paged KV (tiled online softmax, looping over real pages only) and
the ragged prefill layout, each against the dense reference attention of models/decoder.py, over
float pools and over int8 / fp8 pools (against the dense attention of their dequantized values)."""

import jax.numpy as jnp
import numpy as np
import pytest

from meshserve.models.decoder import attention
from meshserve.runtime import kv_cache, kv_quant
from meshserve.runtime.kv_cache import _decode_tiled, _ragged_pallas, _ragged_tiled

N, PS, K, E, H = 48, 4, 2, 8, 4


@pytest.fixture(params=["float32", "int8", "fp8"])
def pages(request):
    """(k, v) pages as a float pool's layer holds them, or (codes, codes, exps, exps) as a
    quantized one's (KVPool.layer); and the float keys and values they stand for."""
    rng = np.random.default_rng(0)
    k, v = (jnp.asarray(rng.standard_normal((N, PS, K, E)) * 3, jnp.float32) for _ in range(2))
    if request.param == "float32":
        return (k, v), (k, v)
    dtype = kv_quant.cache_dtype(request.param, jnp.float32)
    (kc, ke), (vc, ve) = kv_quant.quantize(k, dtype), kv_quant.quantize(v, dtype)
    return (kc, vc, ke, ve), (kv_quant.dequantize(kc, ke, jnp.float32), kv_quant.dequantize(vc, ve, jnp.float32))


def _dense(q, k_pages, v_pages, pages, q_pos, window):
    keys = k_pages[np.array(pages)].reshape(1, -1, K, E)
    values = v_pages[np.array(pages)].reshape(1, -1, K, E)
    return attention(q[None], keys, values, jnp.asarray(q_pos)[None], jnp.arange(keys.shape[1])[None], window)[0]


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("tile_keys", [4, 8, 256])  # one page, two pages, all pages per tile
def test_decode_equals_dense_attention(pages, window, tile_keys, monkeypatch):
    monkeypatch.setattr(kv_cache, "DECODE_TILE_KEYS", tile_keys)
    kv, (k_pages, v_pages) = pages
    rows = [[5, 6, 7], list(range(10, 17)), [30]]
    start = np.array([9, 27, 2], np.int32)
    tables = np.zeros((3, 10), np.int32)
    for b, row in enumerate(rows):
        tables[b, :len(row)] = row
    q = jnp.asarray(np.random.default_rng(1).standard_normal((3, 1, H, E)), jnp.float32)
    out = _decode_tiled(q, kv, jnp.asarray(tables), None, jnp.asarray(start), window, None)
    for b, row in enumerate(rows):
        np.testing.assert_allclose(out[b], _dense(q[b], k_pages, v_pages, row, [start[b]], window), atol=1e-5)


def _ragged_call():
    """Row 0: positions 6…9 over pages 5, 6, 7; row 1: positions 0…4 over pages 10, 11; 3 padding tokens."""
    T = 12
    token_row, pos = np.full(T, -1, np.int32), np.zeros(T, np.int32)
    token_row[:4], pos[:4] = 0, np.arange(6, 10)
    token_row[4:9], pos[4:9] = 1, np.arange(0, 5)
    ctx_pages, ctx_row, ctx_index = np.zeros(8, np.int32), np.full(8, -1, np.int32), np.zeros(8, np.int32)
    ctx_pages[:5], ctx_row[:5], ctx_index[:5] = [5, 6, 7, 10, 11], [0, 0, 0, 1, 1], [0, 1, 2, 0, 1]
    rows = ((slice(0, 4), [5, 6, 7]), (slice(4, 9), [10, 11]))
    return T, token_row, pos, ctx_pages, ctx_row, ctx_index, rows


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("tile_keys", [4, 256])
def test_ragged_prefill_equals_dense_attention_per_row(pages, window, tile_keys, monkeypatch):
    monkeypatch.setattr(kv_cache, "TILE_KEYS", tile_keys)
    kv, (k_pages, v_pages) = pages
    T, token_row, pos, ctx_pages, ctx_row, ctx_index, rows = _ragged_call()
    q = jnp.asarray(np.random.default_rng(2).standard_normal((T, H, E)), jnp.float32)
    out = _ragged_tiled(q, kv, *map(jnp.asarray, (ctx_pages, ctx_row, ctx_index, token_row, pos)),
                        jnp.int32(5), window, None)
    for span, row_pages in rows:
        np.testing.assert_allclose(out[span], _dense(q[span], k_pages, v_pages, row_pages, pos[span], window),
                                   atol=1e-5)


def test_ragged_layout_through_the_pallas_kernel(pages):
    """The flattened call through the ragged prefill kernel, tokens packed (interpreted)."""
    kv, (k_pages, v_pages) = pages
    T, token_row, pos, ctx_pages, ctx_row, _, rows = _ragged_call()
    q = jnp.asarray(np.random.default_rng(3).standard_normal((T, H, E)), jnp.float32)
    out = _ragged_pallas(q, kv, *map(jnp.asarray, (ctx_pages, ctx_row, token_row, pos)), 3, None,
                         interpret=True)
    for span, row_pages in rows:
        np.testing.assert_allclose(out[span], _dense(q[span], k_pages, v_pages, row_pages, pos[span], None),
                                   atol=1e-5)
