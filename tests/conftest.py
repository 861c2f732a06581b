"""Shared fixtures. Tests run on CPU with 8 simulated devices, so sharded paths run here too."""

import os

# Must be set before jax is first imported; one device stays the default for unsharded work.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402


def pytest_terminal_summary(terminalreporter):
    """The versions this run depended on, in every log (pytest -q prints no header)."""
    from meshserve.serving.versions import describe

    terminalreporter.write_line(f"ran on: {describe()}")


@pytest.fixture(scope="session")
def smollm_gguf():
    """The default model's GGUF file (fetched into the user cache once, by `make test` first)."""
    from meshserve.models.default import default_gguf

    return default_gguf()


@pytest.fixture(scope="session")
def smollm_ckpt(smollm_gguf, tmp_path_factory):
    """The default model converted to a float32 checkpoint, loaded on one device."""
    from meshserve.models.checkpoint import load_checkpoint
    from meshserve.models.convert import convert

    out = convert(f"gguf:{smollm_gguf}", tmp_path_factory.mktemp("smollm") / "ckpt", progress=False)
    return load_checkpoint(out, progress=False)


@pytest.fixture(scope="session")
def smollm_hf(smollm_gguf):
    """transformers' own reading of the same GGUF file, float32 on CPU."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        smollm_gguf.parent, gguf_file=smollm_gguf.name, dtype=torch.float32).eval()


TINY_CONFIG = dict(name="tiny", architecture="llama", vocab_size=300, hidden_size=32, intermediate_size=64,
                   num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=512)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """A tiny random model with a real byte-level tokenizer, in memory on one device."""
    from meshserve.models.config import ModelConfig
    from tests.helpers import random_checkpoint

    return random_checkpoint(ModelConfig(**TINY_CONFIG), tmp_path_factory.mktemp("tok"), seed=2)


@pytest.fixture(scope="session")
def tiny_ckpt_dir(tiny_ckpt, tmp_path_factory):
    """The tiny random model as a checkpoint folder, for servers in their own process."""
    from meshserve.models.checkpoint import save_checkpoint

    return save_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", tiny_ckpt.config, tiny_ckpt.params,
                           tiny_ckpt.tokenizer)
