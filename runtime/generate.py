"""The first generation path: one sequence at a time over a dense KV cache.

Two jitted programs: prefill (the prompt, padded to a power-of-two bucket) and decode (one token).
Both return the next token, sampled on device, and take the cache donated. Padding is harmless:
slot s of the dense cache holds position s, so pad positions past the prompt are overwritten by the
real tokens before any query can see them.
"""

from __future__ import annotations

import functools
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from models.checkpoint import Checkpoint
from models.llama import DenseKVCache, forward
from models.errors import RequestError
from runtime import sampling

_MIN_BUCKET = 16


@functools.partial(jax.jit, static_argnames="config", donate_argnums=(3,))
def _prefill(params, tokens, positions, cache, last, temperature, top_p, seed, *, config):
    logits, cache = forward(params, tokens, positions, cache, config=config)
    final = logits[jnp.arange(tokens.shape[0]), last]  # [B, V] at each prompt's last token
    step = jnp.zeros_like(seed)
    return sampling.sample(final, temperature, top_p, seed, step), cache


@functools.partial(jax.jit, static_argnames="config", donate_argnums=(3,))
def _decode(params, tokens, positions, cache, temperature, top_p, seed, step, *, config):
    logits, cache = forward(params, tokens, positions, cache, config=config)
    return sampling.sample(logits[:, -1], temperature, top_p, seed, step), cache


class DenseGenerator:
    def __init__(self, checkpoint: Checkpoint, max_seq_len: int | None = None):
        c = checkpoint.config
        self.checkpoint = checkpoint
        self.max_seq_len = min(max_seq_len or 4096, c.max_position_embeddings)
        self._cache_dtype = checkpoint.dtype

    def stream(self, prompt: Sequence[int], max_tokens: int = 256, temperature: float = 0.0,
               top_p: float = 1.0, seed: int = 0, ignore_eos: bool = False) -> Iterator[int]:
        """Yields generated token ids; stops at an EOS token (not yielded) or after max_tokens."""
        sampling.validate(temperature, top_p, max_tokens)
        n = len(prompt)
        if n == 0:
            raise RequestError("prompt is empty")
        if n + max_tokens > self.max_seq_len:
            raise RequestError(f"prompt ({n} tokens) + max_tokens ({max_tokens}) exceeds the context "
                             f"of {self.max_seq_len} tokens")
        c, params = self.checkpoint.config, self.checkpoint.params
        bucket = min(max(_MIN_BUCKET, 1 << (n - 1).bit_length()), self.max_seq_len)
        tokens = np.zeros((1, bucket), np.int32)
        tokens[0, :n] = prompt
        positions = np.arange(bucket, dtype=np.int32)[None]
        temp = jnp.array([temperature], jnp.float32)
        top = jnp.array([top_p], jnp.float32)
        seeds = jnp.array([seed], jnp.int32)
        cache = DenseKVCache.zeros(c, 1, self.max_seq_len, self._cache_dtype)
        token, cache = _prefill(params, tokens, positions, cache, jnp.array([n - 1]), temp, top, seeds,
                                config=c)
        eos = set(c.eos_token_ids) | set(self.checkpoint.tokenizer.eos_ids)
        for i in range(max_tokens):
            tid = int(token[0])
            if tid in eos and not ignore_eos:
                return
            yield tid
            if i + 1 == max_tokens:
                return
            pos = jnp.array([[n + i]], jnp.int32)
            token, cache = _decode(params, token[:, None], pos, cache, temp, top, seeds,
                                   jnp.array([i + 1], jnp.int32), config=c)
