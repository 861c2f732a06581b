"""Orbax round trips are bitwise exact, on one device and sharded over 8 simulated CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from meshserve.models.checkpoint import load_checkpoint, save_checkpoint
from meshserve.models.config import ModelConfig
from meshserve.models.errors import CheckpointError
from meshserve.models.decoder import init_params
from meshserve.sharding.rules import sharding_fn

# Head counts, vocabulary and MLP all divide 8, so every kind of axis really gets split.
CONFIG = ModelConfig(name="tiny", architecture="llama", vocab_size=128, hidden_size=64,
                     intermediate_size=128, num_layers=2, num_heads=8, num_kv_heads=8, head_dim=8,
                     max_position_embeddings=64)


def _bits(a) -> np.ndarray:
    a = np.asarray(a)
    return a.view(np.uint16 if a.dtype.itemsize == 2 else np.uint32)


def _assert_bitwise_equal(a_tree, b_tree):
    assert jax.tree.structure(a_tree) == jax.tree.structure(b_tree)
    for a, b in zip(jax.tree.leaves(a_tree), jax.tree.leaves(b_tree)):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(_bits(a), _bits(b))


@pytest.fixture(scope="module")
def tokenizer(smollm_ckpt):
    return smollm_ckpt.tokenizer  # any tokenizer will do; the checkpoint stores it beside the params


def _mesh8():
    assert jax.device_count() == 8, "tests run with 8 simulated CPU devices (see conftest.py)"
    return jax.make_mesh((8,), ("tensor",), axis_types=(AxisType.Auto,))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_round_trip_one_device(tmp_path, tokenizer, dtype):
    params = jax.tree.map(np.asarray, init_params(CONFIG, seed=5, dtype=dtype))
    save_checkpoint(tmp_path / "ck", CONFIG, params, tokenizer)
    ckpt = load_checkpoint(tmp_path / "ck", progress=False)
    assert ckpt.config == CONFIG and ckpt.dtype == np.dtype(dtype)
    _assert_bitwise_equal(params, ckpt.params)
    for leaf in jax.tree.leaves(ckpt.params):
        assert leaf.sharding == jax.sharding.SingleDeviceSharding(jax.devices()[0])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_round_trip_eight_devices(tmp_path, tokenizer, dtype):
    params = jax.tree.map(np.asarray, init_params(CONFIG, seed=6, dtype=dtype))
    save_checkpoint(tmp_path / "ck", CONFIG, params, tokenizer)
    mesh = _mesh8()
    ckpt = load_checkpoint(tmp_path / "ck", sharding=sharding_fn(mesh), progress=False)
    _assert_bitwise_equal(params, ckpt.params)
    q = ckpt.params["layers"][0]["attn"]["q_proj"]  # [D, H, E], heads split 8 ways
    assert q.sharding == NamedSharding(mesh, P(None, "tensor", None))
    assert {s.data.shape for s in q.addressable_shards} == {(64, 1, 8)}
    assert len({s.device for s in q.addressable_shards}) == 8
    embed = ckpt.params["embed"]  # [V, D], vocabulary split
    assert embed.sharding.spec == P("tensor", None)
    assert ckpt.params["norm"]["weight"].sharding.spec == P(None)


def test_default_model_on_eight_devices(smollm_ckpt):
    """SmolLM2 has 9 q heads (not split 8 ways: replicated) but vocab and MLP split."""
    mesh = _mesh8()
    sharded = load_checkpoint(smollm_ckpt.path, sharding=sharding_fn(mesh), progress=False)
    _assert_bitwise_equal(smollm_ckpt.params, sharded.params)
    layer = sharded.params["layers"][0]
    assert layer["attn"]["q_proj"].sharding.spec == P(None, None, None)
    assert layer["mlp"]["gate_proj"].sharding.spec == P(None, "tensor")
    assert sharded.params["embed"].addressable_shards[0].data.shape == (49152 // 8, 576)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not a meshserve checkpoint"):
        load_checkpoint(tmp_path, progress=False)


def test_arrays_disagreeing_with_the_config_fail_at_load_naming_the_array(tmp_path, tokenizer):
    """A checkpoint whose config.yaml says 4 experts over arrays of 8: refused before anything is read."""
    import yaml

    moe = ModelConfig(name="moe", architecture="qwen3_moe", vocab_size=128, hidden_size=64, intermediate_size=128,
                      num_layers=2, num_heads=8, num_kv_heads=8, head_dim=8, max_position_embeddings=64,
                      qk_norm=True, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32)
    folder = save_checkpoint(tmp_path / "ckpt", moe, init_params(moe), tokenizer)
    _assert_bitwise_equal(load_checkpoint(folder, progress=False).params, init_params(moe))
    config = yaml.safe_load((folder / "config.yaml").read_text())
    config["num_experts"] = 4
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(CheckpointError, match=r"array layers/0/mlp/down_proj has shape \(8, 32, 64\), its "
                                              r"config\.yaml expects \(4, 32, 64\)"):
        load_checkpoint(folder, progress=False)
