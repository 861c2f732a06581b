import dataclasses

import pytest

from meshserve.models.config import CONFIG_DIR, ModelConfig, RopeScaling, rope_inv_freq
from meshserve.models.errors import ConfigError

SHIPPED = ["smollm2-135m", "llama3-8b", "llama3-70b", "qwen2-7b", "mistral-7b", "qwen3-8b", "qwen3-30b-a3b",
           "qwen3-235b-a22b", "mixtral-8x7b"]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_load(name):
    c = ModelConfig.named(name)
    assert c.num_heads % c.num_kv_heads == 0


def test_shipped_parameter_counts():
    # published sizes: SmolLM2 134.5M (tied), Llama-3.1-8B 8.03B, Llama-3.1-70B 70.6B, Qwen2-7B 7.62B,
    # Mistral-7B-v0.3 7.25B
    counts = {n: ModelConfig.named(n).num_params() for n in SHIPPED}
    assert counts["smollm2-135m"] == 134_515_008
    assert counts["llama3-8b"] == 8_030_261_248
    assert counts["llama3-70b"] == 70_553_706_496
    assert counts["qwen2-7b"] == 7_615_616_512
    assert counts["mistral-7b"] == 7_248_023_552
    # Qwen3-8B 8.2B; Qwen3-30B-A3B 30.5B, 3.3B active; Qwen3-235B-A22B 235B, 22B; Mixtral-8x7B 46.7B, 12.9B
    assert counts["qwen3-8b"] == 8_190_735_360
    active = {n: ModelConfig.named(n).num_params(active=True) for n in SHIPPED}
    assert (counts["qwen3-30b-a3b"], active["qwen3-30b-a3b"]) == (30_532_122_624, 3_353_032_704)
    assert (counts["qwen3-235b-a22b"], active["qwen3-235b-a22b"]) == (235_093_634_560, 22_190_763_520)
    assert (counts["mixtral-8x7b"], active["mixtral-8x7b"]) == (46_702_792_704, 12_879_925_248)
    assert active["qwen3-8b"] == counts["qwen3-8b"]  # dense: every parameter is active


def test_expert_settings_are_checked_and_round_trip(tmp_path):
    moe = ModelConfig.named("qwen3-30b-a3b")
    moe.to_yaml(tmp_path / "moe.yaml")
    assert ModelConfig.from_yaml(tmp_path / "moe.yaml") == moe
    dense = ModelConfig.named("llama3-8b")
    assert "num_experts" not in dense.to_dict() and "qk_norm" not in dense.to_dict()  # files read as before
    with pytest.raises(ConfigError, match=r"num_experts_per_tok \(9\) exceeds num_experts \(8\)"):
        dataclasses.replace(moe, num_experts=8, num_experts_per_tok=9)
    with pytest.raises(ConfigError, match="num_experts must be a positive integer for qwen3_moe"):
        dataclasses.replace(moe, num_experts=0)
    with pytest.raises(ConfigError, match="architecture 'llama' has no experts"):
        dataclasses.replace(dense, num_experts=8)
    with pytest.raises(ConfigError, match=r"dense_layers \[48\] are outside the model's 48 layers"):
        dataclasses.replace(moe, dense_layers=(48,))
    assert [moe.is_moe_layer(i) for i in (0, 47)] == [True, True]
    assert [dataclasses.replace(moe, dense_layers=(0,)).is_moe_layer(i) for i in (0, 1)] == [False, True]


def test_moe_configs_from_hf():
    """Qwen's mlp_only_layers and decoder_sparse_step become dense_layers; Mixtral's experts are
    num_local_experts of intermediate_size, always renormalised."""
    common = dict(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, num_experts_per_tok=2)
    qwen = ModelConfig.from_hf({**common, "model_type": "qwen2_moe", "num_experts": 8, "moe_intermediate_size": 32,
                                "decoder_sparse_step": 2, "mlp_only_layers": [3], "shared_expert_intermediate_size": 48})
    assert (qwen.dense_layers, qwen.norm_topk_prob, qwen.attention_bias, qwen.qk_norm) == ((0, 2, 3), False, True, False)
    assert qwen.shared_expert_intermediate_size == 48
    mixtral = ModelConfig.from_hf({**common, "model_type": "mixtral", "num_local_experts": 8})
    assert (mixtral.num_experts, mixtral.moe_intermediate_size, mixtral.norm_topk_prob) == (8, 96, True)
    qwen3 = ModelConfig.from_hf({**common, "model_type": "qwen3_moe", "num_experts": 8, "moe_intermediate_size": 32,
                                 "norm_topk_prob": True})
    assert qwen3.qk_norm and qwen3.norm_topk_prob and not qwen3.attention_bias and qwen3.dense_layers == ()


def test_smollm2_matches_its_gguf(smollm_ckpt):
    expected = ModelConfig.named("smollm2-135m")
    got = smollm_ckpt.config
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                  "num_kv_heads", "head_dim", "rope_theta", "tie_word_embeddings", "attention_bias"):
        assert getattr(got, field) == getattr(expected, field), field


def test_yaml_round_trip(tmp_path):
    c = ModelConfig.named("llama3-8b")
    c.to_yaml(tmp_path / "c.yaml")
    assert ModelConfig.from_yaml(tmp_path / "c.yaml") == c


def _base(**kw):
    values = dict(name="t", architecture="llama", vocab_size=10, hidden_size=8, intermediate_size=16,
                  num_layers=1, num_heads=4, num_kv_heads=2, head_dim=2, max_position_embeddings=32)
    values.update(kw)
    return values


@pytest.mark.parametrize("change,message", [
    (dict(architecture="gpt2"), "unsupported architecture 'gpt2'"),
    (dict(num_kv_heads=3), r"num_heads \(4\) must be a multiple of num_kv_heads \(3\)"),
    (dict(hidden_size=0), "hidden_size must be a positive integer"),
    (dict(head_dim=3), "head_dim must be even"),
    (dict(eos_token_ids=(10,)), "outside the vocabulary"),
    (dict(sliding_window=0), "sliding_window must be positive"),
])
def test_invalid_values_are_named(change, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_dict(_base(**change))


def test_unknown_and_missing_fields():
    with pytest.raises(ConfigError, match="unknown field.*colour"):
        ModelConfig.from_dict(_base(colour="red"))
    values = _base()
    del values["vocab_size"]
    with pytest.raises(ConfigError, match="missing field.*vocab_size"):
        ModelConfig.from_dict(values)
    with pytest.raises(ConfigError, match="no model config named 'llama9'"):
        ModelConfig.named("llama9")


def test_llama3_rope_scaling_matches_transformers():
    import torch
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    c = ModelConfig.named("llama3-8b")
    hf = LlamaConfig(hidden_size=4096, num_attention_heads=32, max_position_embeddings=131072,
                     rope_scaling={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 8192})
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, torch.device("cpu"))
    ours = rope_inv_freq(c)
    assert ours.dtype.name == "float32"
    import numpy as np
    np.testing.assert_allclose(ours, ref.numpy(), rtol=1e-6)
    # and scaling really changed the low frequencies
    plain = rope_inv_freq(dataclasses.replace(c, rope_scaling=None))
    assert ours[-1] == pytest.approx(plain[-1] / 8, rel=1e-6) and ours[0] == plain[0]


def test_rope_scaling_validation():
    with pytest.raises(ConfigError, match="low_freq_factor < high_freq_factor"):
        RopeScaling(factor=8, low_freq_factor=4, high_freq_factor=1, original_max_position_embeddings=8192)


def test_config_dir_is_shipped():
    assert sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")) == sorted(SHIPPED)
