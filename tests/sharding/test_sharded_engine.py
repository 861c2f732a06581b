"""The engine on 8 simulated CPU devices: every mesh gives the tokens and logits of one device."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from meshserve.models.checkpoint import Checkpoint
from meshserve.models.config import ModelConfig
from meshserve.models.decoder import forward, init_params
from meshserve.runtime.engine import Engine, EngineConfig
from meshserve.runtime.sampling import SamplingParams
from meshserve.sharding.mesh import MeshConfig
from tests.runtime.conftest import greedy_reference

MESHES = {"tensor=1": (1, 1), "tensor=2": (1, 2), "tensor=4": (1, 4), "tensor=8": (1, 8),
          "data=2,tensor=4": (2, 4)}

# Head counts that divide 8, so every mesh splits attention; and one with kv heads fewer than 8.
WIDE = ModelConfig(name="wide", architecture="llama", vocab_size=296, hidden_size=64, intermediate_size=128,
                   num_layers=2, num_heads=16, num_kv_heads=8, head_dim=8, max_position_embeddings=512)
NARROW_KV = dataclasses.replace(WIDE, name="narrow-kv", num_kv_heads=2)

SMALL = EngineConfig(page_size=8, kv_cache_bytes=2**20, max_seq_len=128, max_num_seqs=4,
                     max_num_batched_tokens=32, max_prefill_chunk=32, prefill_buckets=(32,),
                     decode_buckets=(4,), context_buckets=(16,))


def layout(data: int, tensor: int):
    return MeshConfig.from_dict({"axes": {"data": data, "tensor": tensor}, "num_devices": data * tensor}).build()


def random_ckpt(tiny_ckpt, config: ModelConfig) -> Checkpoint:
    params = jax.tree.map(lambda a: a * 20 if a.ndim > 1 else a, init_params(config, seed=3))
    return dataclasses.replace(tiny_ckpt, config=config, params=params)


def prompts(seed: int, vocab: int = 256) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, n).tolist() for n in (1, 7, 40, 19, 33, 3)]


def engine_tokens(ckpt: Checkpoint, lay, config: EngineConfig = SMALL, n: int = 8):
    """Greedy tokens for prompts(0) on `lay`; also the engine (its pages all free again)."""
    placed = dataclasses.replace(ckpt, params=lay.place(ckpt.params, ckpt.config))
    engine = Engine(placed, config, layout=lay)
    out = engine.generate(prompts(0), SamplingParams(max_tokens=n, ignore_eos=True))
    assert engine.kv.num_free == engine.kv.num_usable
    return [list(c.token_ids) for c in out], engine


def run(ckpt: Checkpoint, mesh: tuple[int, int], config: EngineConfig = SMALL, n: int = 8):
    return engine_tokens(ckpt, layout(*mesh), config, n)


def test_eight_devices_are_there():
    assert jax.device_count() == 8


@pytest.fixture(scope="module")
def one_device(tiny_ckpt):
    """Tokens on one device, checked once against the dense no-cache forward pass."""
    results = {}
    for model in (WIDE, NARROW_KV):
        ckpt = random_ckpt(tiny_ckpt, model)
        results[model.name], _ = run(ckpt, MESHES["tensor=1"])
    ckpt = random_ckpt(tiny_ckpt, WIDE)
    assert results["wide"][:2] == [greedy_reference(ckpt, p, 8) for p in prompts(0)[:2]]
    return results


@pytest.mark.parametrize("model", [WIDE, NARROW_KV], ids=lambda c: c.name)
def test_random_model_tokens_equal_one_device(tiny_ckpt, one_device, model):
    ckpt = random_ckpt(tiny_ckpt, model)
    for name, mesh in MESHES.items():
        if name == "tensor=1":
            continue
        tokens, engine = run(ckpt, mesh)
        assert tokens == one_device[model.name], name
        q = engine.checkpoint.params["layers"][0]["attn"]["q_proj"]
        assert tuple(q.sharding.spec)[1] == "tensor", name  # attention heads really are split
        if mesh[0] > 1:
            assert tuple(engine.pool.k[0].sharding.spec)[0] == "data", name


def test_pallas_attention_runs_per_shard(tiny_ckpt, one_device):
    ckpt = random_ckpt(tiny_ckpt, WIDE)
    tokens, engine = run(ckpt, (2, 4), dataclasses.replace(SMALL, attention="pallas"), n=4)
    assert engine.attention == "pallas"
    assert tokens == [t[:4] for t in one_device["wide"]]


def _logits(params, config, ids):
    fn = jax.jit(forward, static_argnames="config")
    logits, _ = fn(params, jnp.asarray(ids, jnp.int32), jnp.arange(ids.shape[1], dtype=jnp.int32)[None].repeat(
        ids.shape[0], 0), config=config)
    return np.asarray(logits)


@pytest.mark.parametrize("model", [WIDE, NARROW_KV], ids=lambda c: c.name)
def test_random_model_logits_within_1e4(tiny_ckpt, model):
    ckpt = random_ckpt(tiny_ckpt, model)
    ids = np.random.default_rng(1).integers(0, 256, (4, 24))
    ref = _logits(ckpt.params, model, ids)
    for name, mesh in MESHES.items():
        got = _logits(layout(*mesh).place(ckpt.params, model), model, ids)
        assert np.linalg.norm(got - ref) / np.linalg.norm(ref) <= 1e-4, name


def test_default_model_on_every_mesh(smollm_ckpt):
    """SmolLM2's 9 q / 3 kv heads do not split over 2, 4 or 8: attention is replicated, the MLP and
    vocabulary split; tokens and logits must not change."""
    config = dataclasses.replace(SMALL, kv_cache_bytes=16 * 2**20)  # one 128-token request per replica
    chat = [smollm_ckpt.tokenizer.encode_chat([{"role": "user", "content": q}])
            for q in ("What is the capital of France?", "Name a colour.")]
    ids = np.array([chat[0][:16], chat[1][:16]])
    ref_logits = _logits(smollm_ckpt.params, smollm_ckpt.config, ids)
    results = {}
    for name, mesh in MESHES.items():
        lay = layout(*mesh)
        params = lay.place(smollm_ckpt.params, smollm_ckpt.config)
        got = _logits(params, smollm_ckpt.config, ids)
        assert np.linalg.norm(got - ref_logits) / np.linalg.norm(ref_logits) <= 1e-4, name
        if mesh[1] > 1:
            assert tuple(params["layers"][0]["mlp"]["gate_proj"].sharding.spec) == (None, "tensor"), name
        engine = Engine(dataclasses.replace(smollm_ckpt, params=params), config, layout=lay)
        out = engine.generate(chat, SamplingParams(max_tokens=8))
        results[name] = [c.token_ids for c in out]
    assert all(r == results["tensor=1"] for r in results.values()), results
