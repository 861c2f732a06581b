"""A tiny random model with a real byte-level tokenizer, and its greedy no-cache reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tokenizers import Tokenizer as HFTokenizer

from models.checkpoint import Checkpoint
from models.config import ModelConfig
from models.llama import forward, init_params
from models.tokenizer import Tokenizer, TokenizerConfig
from tests.helpers import CHAT_TEMPLATE, write_tokenizer

TINY = ModelConfig(name="tiny", architecture="llama", vocab_size=300, hidden_size=32, intermediate_size=64,
                   num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=512)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Checkpoint:
    folder = tmp_path_factory.mktemp("tok")
    write_tokenizer(folder)
    tok = Tokenizer(HFTokenizer.from_file(str(folder / "tokenizer.json")),
                    TokenizerConfig("<|im_start|>", ("<|im_end|>",), False, CHAT_TEMPLATE))
    # Larger weights than the default init: logits far apart, so greedy never hangs on a near-tie.
    params = jax.tree.map(lambda a: a * 20 if a.ndim > 1 else a, init_params(TINY, seed=2))
    return Checkpoint(path=None, config=TINY, tokenizer=tok, dtype=np.dtype("float32"), params=params)


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
