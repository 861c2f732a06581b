"""The dense-cache generator against the plain no-cache forward pass."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.checkpoint import Checkpoint
from models.config import ModelConfig
from models.errors import RequestError
from models.llama import forward, init_params
from runtime.generate import DenseGenerator

CONFIG = ModelConfig(name="tiny", architecture="llama", vocab_size=64, hidden_size=32,
                     intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                     max_position_embeddings=256, eos_token_ids=(63,))


class _NoTokenizer:
    eos_ids = ()


def _checkpoint(config=CONFIG):
    # Larger weights than the default init, so the logits are far from ties.
    params = jax.tree.map(lambda a: a * 20 if a.ndim > 1 else a, init_params(config, seed=2))
    return Checkpoint(path=None, config=config, tokenizer=_NoTokenizer(), dtype=np.dtype("float32"),
                      params=params)


def _greedy_no_cache(ckpt, prompt, n):
    ids = list(prompt)
    f = jax.jit(forward, static_argnames="config")
    for _ in range(n):
        logits, _ = f(ckpt.params, jnp.asarray([ids]), jnp.arange(len(ids))[None], config=ckpt.config)
        ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("prompt_len", [1, 16, 17, 40])  # bucket edges: 16 fits, 17 pads to 32
def test_greedy_equals_no_cache_forward(prompt_len):
    ckpt = _checkpoint()
    prompt = np.random.default_rng(prompt_len).integers(0, 60, prompt_len).tolist()
    ours = list(DenseGenerator(ckpt, max_seq_len=128).stream(prompt, max_tokens=12, ignore_eos=True))
    assert ours == _greedy_no_cache(ckpt, prompt, 12)


def test_stops_at_eos_and_seed_is_deterministic():
    ckpt = _checkpoint()
    gen = DenseGenerator(ckpt, max_seq_len=128)
    greedy = _greedy_no_cache(ckpt, [5, 6, 7], 30)
    eos_ckpt = _checkpoint(dataclasses.replace(CONFIG, eos_token_ids=(greedy[3],)))
    assert list(DenseGenerator(eos_ckpt, max_seq_len=128).stream([5, 6, 7], max_tokens=30)) == \
        greedy[:greedy.index(greedy[3])]
    a = list(gen.stream([5, 6, 7], max_tokens=20, temperature=1.0, seed=11, ignore_eos=True))
    assert a == list(gen.stream([5, 6, 7], max_tokens=20, temperature=1.0, seed=11, ignore_eos=True))
    assert a != list(gen.stream([5, 6, 7], max_tokens=20, temperature=1.0, seed=12, ignore_eos=True))


def test_bad_requests():
    gen = DenseGenerator(_checkpoint(), max_seq_len=32)
    with pytest.raises(RequestError, match="prompt is empty"):
        next(gen.stream([], max_tokens=4))
    with pytest.raises(RequestError, match="exceeds the context of 32 tokens"):
        next(gen.stream([1] * 30, max_tokens=4))
    with pytest.raises(RequestError, match="top_p"):
        next(gen.stream([1], top_p=2.0))
