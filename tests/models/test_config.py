import dataclasses

import pytest

from meshserve.models.config import CONFIG_DIR, ModelConfig, RopeScaling, rope_inv_freq
from meshserve.models.errors import ConfigError

SHIPPED = ["smollm2-135m", "llama3-8b", "llama3-70b", "qwen2-7b", "mistral-7b"]


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
