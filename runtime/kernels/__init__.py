"""Attention over the paged KV cache: a plain-jnp reference and Pallas kernels with one signature.

    paged_decode(q, k_pages, v_pages, page_tables, lengths[, k_exp, v_exp])    one query token per sequence
    ragged_prefill(q, k_pages, v_pages, page_tables, q_first, q_start, q_len[, k_exp, v_exp])
                                                                     packed chunks of queries, one per sequence

Both read keys and values only through the page tables of the pool layout of runtime/kv_cache.py
([num_pages, page_size, kv_heads, head_dim] per layer; an int8 / fp8 pool's scale exponents
[num_pages, page_size, kv_heads] beside them); the new tokens' K/V are already written.
"""
