"""Plain-jnp references for the paged attention kernels: float32 softmax and accumulation, the
ground truth of every kernel test and the CPU path of the engine."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from meshserve.runtime.kv_quant import dequantize

_MASKED = -1e30


def _gather(pages: Float[Array, "n s k e"], tables: Int[Array, "b p"]) -> Float[Array, "b l k e"]:
    g = pages[tables]  # [B, P, page_size, K, E]
    return g.reshape(g.shape[0], -1, *g.shape[3:])


def ragged_prefill_reference(q: Float[Array, "b t h e"], k_pages: Float[Array, "n s k e"],
                             v_pages: Float[Array, "n s k e"], page_tables: Int[Array, "b p"],
                             q_start: Int[Array, "b"], q_len: Int[Array, "b"],
                             sliding_window: int | None = None, k_exp: Int[Array, "n s k"] | None = None,
                             v_exp: Int[Array, "n s k"] | None = None) -> Float[Array, "b t h e"]:
    """Query t of row b sits at position q_start[b] + t and sees keys at positions [0, that]
    (and, with a window, > that − window). Rows t >= q_len[b] are padding and come out zero. A
    quantized pool comes with its scale exponents (runtime/kv_quant.py)."""
    B, T, H, E = q.shape
    if k_exp is not None:
        k_pages, v_pages = dequantize(k_pages, k_exp, jnp.float32), dequantize(v_pages, v_exp, jnp.float32)
    keys, values = _gather(k_pages, page_tables), _gather(v_pages, page_tables)
    K = keys.shape[2]
    q_pos = q_start[:, None] + jnp.arange(T)[None]  # [B, T]
    k_pos = jnp.arange(keys.shape[1])[None, None]  # [1, 1, L]
    visible = k_pos <= q_pos[..., None]
    if sliding_window is not None:
        visible &= k_pos > q_pos[..., None] - sliding_window
    qg = q.reshape(B, T, K, H // K, E).astype(jnp.float32)
    scores = jnp.einsum("btkge,blke->bkgtl", qg, keys.astype(jnp.float32)) * E ** -0.5
    scores = jnp.where(visible[:, None, None], scores, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bkgtl,blke->btkge", probs, values.astype(jnp.float32)).reshape(B, T, H, E)
    valid = jnp.arange(T)[None] < q_len[:, None]
    return jnp.where(valid[..., None, None], out, 0).astype(q.dtype)


def paged_decode_reference(q: Float[Array, "b h e"], k_pages: Float[Array, "n s k e"],
                           v_pages: Float[Array, "n s k e"], page_tables: Int[Array, "b p"],
                           lengths: Int[Array, "b"], sliding_window: int | None = None,
                           k_exp: Int[Array, "n s k"] | None = None,
                           v_exp: Int[Array, "n s k"] | None = None) -> Float[Array, "b h e"]:
    """One query per row at position lengths[b] − 1, over that row's first lengths[b] keys."""
    out = ragged_prefill_reference(q[:, None], k_pages, v_pages, page_tables, lengths - 1,
                                   jnp.ones_like(lengths), sliding_window, k_exp, v_exp)
    return out[:, 0]
