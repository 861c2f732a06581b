"""The decoder on its own: the dense cache path equals the no-cache pass; attention masks exactly."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from meshserve.models.config import ModelConfig
from meshserve.models.decoder import DenseKVCache, abstract_params, attention, forward, init_params, param_axes

CONFIG = ModelConfig(name="tiny", architecture="llama", vocab_size=97, hidden_size=48,
                     intermediate_size=96, num_layers=3, num_heads=6, num_kv_heads=2, head_dim=8,
                     max_position_embeddings=128, attention_bias=True)
_forward = jax.jit(forward, static_argnames="config")


def test_param_tree_shapes_and_axes():
    shapes = jax.tree.map(lambda a: a.shape, abstract_params(CONFIG))
    axes = param_axes(CONFIG)
    attn = shapes["layers"][0]["attn"]
    assert attn["q_proj"] == (48, 6, 8) and attn["k_proj"] == (48, 2, 8) and attn["o_proj"] == (6, 8, 48)
    assert axes["layers"][0]["attn"]["k_proj"] == ("embed", "kv_heads", "head_dim")
    assert shapes["lm_head"] == (48, 97) and axes["lm_head"] == ("embed", "vocab")
    # every leaf has as many axis names as dimensions
    for shape, names in zip(jax.tree.leaves(shapes, is_leaf=lambda x: isinstance(x, tuple)),
                            jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple))):
        assert len(shape) == len(names)
    tied = dataclasses.replace(CONFIG, tie_word_embeddings=True)
    assert "lm_head" not in abstract_params(tied)


@pytest.mark.parametrize("window", [None, 5])
def test_cache_in_chunks_equals_no_cache(window):
    c = dataclasses.replace(CONFIG, sliding_window=window)
    params = init_params(c, seed=1)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 97, (2, 20)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(20, dtype=jnp.int32), (2, 20))
    full, _ = _forward(params, tokens, positions, config=c)
    cache = DenseKVCache.zeros(c, 2, 32)
    chunks = []
    for lo, hi in ((0, 7), (7, 8), (8, 20)):
        logits, cache = _forward(params, tokens[:, lo:hi], positions[:, lo:hi], cache, config=c)
        chunks.append(logits)
    np.testing.assert_allclose(np.concatenate(chunks, axis=1), full, rtol=1e-5, atol=1e-5)


def _attention_numpy(q, k, v, q_pos, k_pos, window):
    B, T, H, E = q.shape
    K = k.shape[2]
    out = np.zeros_like(q)
    for b in range(B):
        for t in range(T):
            for h in range(H):
                kv = h // (H // K)
                seen = [s for s in range(k.shape[1]) if k_pos[b, s] <= q_pos[b, t]
                        and (window is None or k_pos[b, s] > q_pos[b, t] - window)]
                s = np.array([q[b, t, h] @ k[b, j, kv] for j in seen]) / np.sqrt(E)
                p = np.exp(s - s.max())
                out[b, t, h] = (p / p.sum()) @ v[b, seen, kv]
    return out


@pytest.mark.parametrize("window", [None, 3])
def test_attention_against_loops(window):
    rng = np.random.default_rng(7)
    q = rng.standard_normal((2, 4, 4, 8)).astype(np.float32)
    k = rng.standard_normal((2, 9, 2, 8)).astype(np.float32)
    v = rng.standard_normal((2, 9, 2, 8)).astype(np.float32)
    q_pos = np.array([[5, 6, 7, 8], [0, 1, 2, 3]], np.int32)  # a causal offset, and a fresh start
    k_pos = np.tile(np.arange(9, dtype=np.int32), (2, 1))
    ours = attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(q_pos),
                     jnp.asarray(k_pos), window)
    np.testing.assert_allclose(ours, _attention_numpy(q, k, v, q_pos, k_pos, window), rtol=1e-5, atol=1e-6)
