"""The greedy no-cache reference of a model (tiny_ckpt, the tiny random model, is in tests/conftest.py)."""

import jax
import jax.numpy as jnp
import numpy as np

from meshserve.models.checkpoint import Checkpoint
from meshserve.models.decoder import forward

_forward = jax.jit(forward, static_argnames="config")


def greedy_reference(ckpt: Checkpoint, prompt: list[int], n: int, eos: frozenset = frozenset()) -> list[int]:
    """Greedy tokens from the plain dense forward pass over the whole sequence, no cache."""
    ids = list(prompt)
    for _ in range(n):
        logits, _ = _forward(ckpt.params, jnp.asarray([ids], jnp.int32),
                             jnp.arange(len(ids), dtype=jnp.int32)[None], config=ckpt.config)
        token = int(np.argmax(logits[0, -1]))
        if token in eos:
            break
        ids.append(token)
    return ids[len(prompt):]


def reference_logits(ckpt: Checkpoint, ids: list[int]) -> np.ndarray:
    logits, _ = _forward(ckpt.params, jnp.asarray([ids], jnp.int32),
                         jnp.arange(len(ids), dtype=jnp.int32)[None], config=ckpt.config)
    return np.asarray(logits[0, -1])


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
