"""The greedy no-cache reference of a model (tiny_ckpt, the tiny random model, is in tests/conftest.py)."""

import jax
import jax.numpy as jnp
import numpy as np

from meshserve.models.checkpoint import Checkpoint
from meshserve.models.decoder import forward

_forward = jax.jit(forward, static_argnames="config")


def reference_logits(ckpt: Checkpoint, ids: list[int]) -> np.ndarray:
    """The last token's logits from the plain dense forward pass over the whole sequence, no cache.
    The sequence is padded on the right to a multiple of 32 tokens (no earlier token sees a later one),
    so that one compiled program serves 32 lengths."""
    n = len(ids)
    padded = max(n, min(-(-n // 32) * 32, ckpt.config.max_position_embeddings))
    logits, _ = _forward(ckpt.params, jnp.asarray([list(ids) + [0] * (padded - n)], jnp.int32),
                         jnp.arange(padded, dtype=jnp.int32)[None], config=ckpt.config)
    return np.asarray(logits[0, n - 1])


def greedy_reference(ckpt: Checkpoint, prompt: list[int], n: int, eos: frozenset = frozenset()) -> list[int]:
    """Greedy tokens from the plain dense forward pass over the whole sequence, no cache."""
    ids = list(prompt)
    for _ in range(n):
        token = int(np.argmax(reference_logits(ckpt, ids)))
        if token in eos:
            break
        ids.append(token)
    return ids[len(prompt):]


def penalized_reference(ckpt: Checkpoint, prompt: list[int], n: int, repetition: float = 1.0,
                        presence: float = 0.0, frequency: float = 0.0) -> list[int]:
    """Greedy tokens under HF-style repetition and OpenAI-style presence/frequency penalties, on
    the host, from the no-cache forward pass."""
    ids = list(prompt)
    for _ in range(n):
        logits = reference_logits(ckpt, ids)
        seen = np.zeros_like(logits, bool)
        seen[ids] = True
        counts = np.bincount(ids[len(prompt):], minlength=logits.size).astype(np.float32)
        logits = np.where(seen, np.where(logits > 0, logits / repetition, logits * repetition), logits)
        logits = logits - presence * (counts > 0) - frequency * counts
        ids.append(int(logits.argmax()))
    return ids[len(prompt):]
