"""The model fingerprint that salts prefix-cache hashes: from what decides the K/V, never from where
the checkpoint lies; and what it means for a store shared across restarts and servers."""

import dataclasses
import shutil

import numpy as np

from meshserve.models.checkpoint import load_checkpoint, save_checkpoint
from meshserve.runtime.engine import Engine, EngineConfig
from meshserve.runtime.identity import model_fingerprint
from meshserve.runtime.sampling import SamplingParams
from tests.helpers import random_checkpoint
from tests.runtime.conftest import greedy_reference

CONFIG = EngineConfig(page_size=4, kv_cache_bytes=2**16, max_seq_len=64, max_num_seqs=2, max_num_batched_tokens=32,
                      max_prefill_chunk=32, prefill_buckets=(32,), decode_buckets=(2,), context_buckets=(16,))


def test_fingerprint_names_the_contents_not_the_place(tiny_ckpt, tmp_path):
    c, params = tiny_ckpt.config, tiny_ckpt.params
    base = model_fingerprint(c, params, np.float32, 16)
    assert len(base) == 16
    assert model_fingerprint(dataclasses.replace(c, name="renamed"), params, np.float32, 16) == base
    a = load_checkpoint(save_checkpoint(tmp_path / "a", c, params, tiny_ckpt.tokenizer), progress=False)
    b = load_checkpoint(save_checkpoint(tmp_path / "b", c, params, tiny_ckpt.tokenizer), progress=False)
    assert model_fingerprint(a.config, a.params, a.dtype, 16) == model_fingerprint(b.config, b.params, b.dtype, 16) == base
    other = random_checkpoint(c, tmp_path / "tok", seed=5)  # same config and shapes, other weights
    assert model_fingerprint(c, other.params, np.float32, 16) != base
    assert model_fingerprint(c, params, np.float32, 8) != base
    assert model_fingerprint(c, params, np.dtype("bfloat16"), 16) != base
    assert model_fingerprint(dataclasses.replace(c, rope_theta=5e5), params, np.float32, 16) != base


def _run(engine, prompt):
    out = engine.generate([prompt], SamplingParams(max_tokens=6, ignore_eos=True))[0]
    return list(out.token_ids)


def test_a_store_is_shared_by_model_not_by_path(tiny_ckpt, tmp_path):
    """The same model at another path hits the store; another model converted to the same path
    misses it and gives its own reference output."""
    store = dict(host_kv_bytes=0, kv_store=str(tmp_path / "kv"))
    config = dataclasses.replace(CONFIG, **store)
    prompt = np.random.default_rng(3).integers(0, 260, 30).tolist()
    x = load_checkpoint(save_checkpoint(tmp_path / "model", tiny_ckpt.config, tiny_ckpt.params, tiny_ckpt.tokenizer),
                        progress=False)
    writer = Engine(x, config)
    assert _run(writer, prompt) == greedy_reference(x, prompt, 6)
    assert writer.persist_prefix_cache() == 8  # 35 computed tokens: 8 full pages of 4

    same = load_checkpoint(save_checkpoint(tmp_path / "elsewhere", x.config, x.params, x.tokenizer), progress=False)
    reader = Engine(same, config)
    assert _run(reader, prompt) == greedy_reference(x, prompt, 6)
    assert reader.stats()["store_hit_pages"] == 7  # the last prompt token is always computed

    shutil.rmtree(tmp_path / "model")  # another model, converted to the old one's folder
    y = random_checkpoint(tiny_ckpt.config, tmp_path / "tok", seed=5)
    y = load_checkpoint(save_checkpoint(tmp_path / "model", y.config, y.params, y.tokenizer), progress=False)
    other = Engine(y, config)
    assert _run(other, prompt) == greedy_reference(y, prompt, 6) != greedy_reference(x, prompt, 6)
    assert other.stats()["store_hit_pages"] == 0
