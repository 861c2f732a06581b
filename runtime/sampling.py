"""Token sampling on device. Per-request values (temperature, top-p, seed) are arrays, so a new
value never recompiles; randomness comes from (seed, step) alone, so the same seed gives the same
tokens and no PRNG key is ever stored."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from models.errors import RequestError


def validate(temperature: float, top_p: float, max_tokens: int) -> None:
    if not temperature >= 0:
        raise RequestError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise RequestError(f"top_p must be in (0, 1], got {top_p}")
    if max_tokens <= 0:
        raise RequestError(f"max_tokens must be positive, got {max_tokens}")


def sample(logits: Float[Array, "b v"], temperature: Float[Array, "b"], top_p: Float[Array, "b"],
           seed: Int[Array, "b"], step: Int[Array, "b"]) -> Int[Array, "b"]:
    """Greedy where temperature == 0; else nucleus sampling at that temperature."""
    logits = logits.astype(jnp.float32)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
    # Nucleus: keep the smallest set of top tokens whose probability reaches top_p (at least one).
    ordered = jnp.sort(scaled, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(ordered, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly better tokens
    kept = before < top_p[:, None]
    threshold = jnp.min(jnp.where(kept, ordered, jnp.inf), axis=-1, keepdims=True)
    masked = jnp.where(scaled >= threshold, scaled, -jnp.inf)
    keys = jax.vmap(lambda s, t: jax.random.fold_in(jax.random.key(s), t))(seed, step)
    sampled = jax.vmap(jax.random.categorical)(keys, masked).astype(jnp.int32)
    return jnp.where(temperature > 0, sampled, greedy)
