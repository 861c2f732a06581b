"""Expert parallelism on simulated CPU devices: a mixture-of-experts model with its experts split over
an `expert` mesh axis (alone, and with `tensor`) gives the greedy tokens of one device."""

import dataclasses

import jax
import pytest

from meshserve.models.config import ModelConfig
from meshserve.models.errors import ConfigError
from meshserve.runtime.engine import Engine
from meshserve.sharding.mesh import MeshConfig
from tests.runtime.conftest import greedy_reference
from tests.sharding.test_sharded_engine import SMALL, engine_tokens, prompts, random_ckpt

# Qwen3-MoE-shaped: q/k norm, 16 experts, top-2 renormalised; a dense first layer as Qwen's
# mlp_only_layers make. With 8 or more experts per shard the experts run grouped, with fewer all at
# once (models/moe.py): the meshes below take both paths.
MOE = ModelConfig(name="tiny-moe", architecture="qwen3_moe", vocab_size=296, hidden_size=64,
                  intermediate_size=96, num_layers=3, num_heads=8, num_kv_heads=4, head_dim=8,
                  max_position_embeddings=512, qk_norm=True, num_experts=16, num_experts_per_tok=2,
                  moe_intermediate_size=32, norm_topk_prob=True, dense_layers=(0,))
MESHES = {"expert=2": (1, 1, 2), "expert=4": (1, 1, 4), "tensor=2,expert=2": (1, 2, 2), "tensor=2,expert=4": (1, 2, 4),
          "data=2,expert=4": (2, 1, 4)}


def layout(data: int, tensor: int, expert: int):
    return MeshConfig.from_dict({"axes": {"data": data, "tensor": tensor, "expert": expert},
                                 "num_devices": data * tensor * expert}).build()


@pytest.fixture(scope="module")
def moe_ckpt(tiny_ckpt):
    return random_ckpt(tiny_ckpt, MOE)


@pytest.fixture(scope="module")
def one_device(moe_ckpt):
    tokens, _ = engine_tokens(moe_ckpt, layout(1, 1, 1))
    assert tokens[:2] == [greedy_reference(moe_ckpt, p, 8) for p in prompts(0)[:2]]
    return tokens


@pytest.mark.parametrize("mesh", list(MESHES))
def test_expert_parallel_tokens_equal_one_device(moe_ckpt, one_device, mesh):
    lay = layout(*MESHES[mesh])
    tokens, engine = engine_tokens(moe_ckpt, lay)
    assert tokens == one_device
    gate = engine.checkpoint.params["layers"][1]["mlp"]["gate_proj"]
    expert = MESHES[mesh][2]
    assert gate.sharding.spec[0] == "expert"  # the experts really are split: each device holds 16 / expert
    assert {s.data.shape[0] for s in gate.addressable_shards} == {16 // expert}
    assert engine.layout.experts(MOE, "cpu").shards == expert


def test_mesh_whose_expert_axis_does_not_divide_the_experts_is_refused(moe_ckpt):
    six = dataclasses.replace(MOE, num_experts=6)
    with pytest.raises(ConfigError, match="6 experts cannot be split over mesh axis 'expert' of size 4"):
        Engine(dataclasses.replace(moe_ckpt, config=six), SMALL, layout=layout(1, 1, 4))
    dense = dataclasses.replace(MOE, architecture="qwen3", num_experts=0, num_experts_per_tok=0,
                                moe_intermediate_size=0, dense_layers=())
    with pytest.raises(ConfigError, match="splits experts over 'expert'.*has no experts"):
        layout(1, 1, 2).for_model(dense)


def test_devices_are_there():
    assert jax.device_count() == 8
