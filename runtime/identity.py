"""What names a model's KV pages: a digest of everything that decides their contents.

Prefix-cache pages are found by a hash chained over their tokens and salted with this fingerprint,
in device memory, in host memory and in a store shared by several servers across restarts. So it
must change whenever the K/V of the same tokens could differ — another architecture or config,
other weights, another KV dtype or page size — and must not change when nothing that matters did
(the checkpoint's folder or the model's display name). A KV-aware router hashes prompts with it too
(the server publishes it).

The weights enter by a sample: a fixed set of elements spread over every parameter array, read in
one small compiled program (every weight of a fine-tune differs from its base; reading all of an
8B model would cost seconds at start-up).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

import jax
import jax.numpy as jnp
import numpy as np

from meshserve.models.config import ModelConfig
from meshserve.runtime import kv_quant

SAMPLES_PER_ARRAY = 64


def model_fingerprint(config: ModelConfig, params, kv_dtype, page_size: int, replicated=None) -> bytes:
    """16 bytes. `replicated`: a sharding every process can read the sample from (sharded params)."""
    h = hashlib.blake2b(digest_size=16)
    described = {k: v for k, v in dataclasses.asdict(config).items() if k != "name"}
    h.update(json.dumps(described, sort_keys=True, default=str).encode())
    leaves = jax.tree_util.tree_leaves_with_path(params)
    for path, leaf in leaves:
        h.update(f"{jax.tree_util.keystr(path)}:{tuple(leaf.shape)}:{np.dtype(leaf.dtype).name};".encode())
    h.update(f"kv:{np.dtype(kv_dtype).name}:{page_size}".encode())
    if kv_quant.is_quantized(kv_dtype):  # and how its pages encode values (runtime/kv_quant.py)
        h.update(f":{kv_quant.SCHEME}".encode())
    sample = jax.jit(_sample, out_shardings=replicated)([leaf for _, leaf in leaves])
    h.update(np.asarray(sample.addressable_data(0)).tobytes())
    return h.digest()


def _sample(arrays):
    picked = []
    for a in arrays:
        flat = a.reshape(-1)
        idx = np.linspace(0, flat.size - 1, min(SAMPLES_PER_ARRAY, flat.size)).astype(np.int32)
        picked.append(flat[idx].astype(jnp.float32))
    return jnp.concatenate(picked)
