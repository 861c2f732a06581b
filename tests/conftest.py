"""Shared fixtures. Tests run on CPU with 8 simulated devices, so sharded paths run here too."""

import os

# Must be set before jax is first imported; one device stays the default for unsharded work.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smollm_gguf():
    """The default model's GGUF file (fetched into the user cache once, by `make test` first)."""
    from models.default import default_gguf

    return default_gguf()


@pytest.fixture(scope="session")
def smollm_ckpt(smollm_gguf, tmp_path_factory):
    """The default model converted to a float32 checkpoint, loaded on one device."""
    from models.checkpoint import load_checkpoint
    from models.convert import convert

    out = convert(f"gguf:{smollm_gguf}", tmp_path_factory.mktemp("smollm") / "ckpt", progress=False)
    return load_checkpoint(out, progress=False)


@pytest.fixture(scope="session")
def smollm_hf(smollm_gguf):
    """transformers' own reading of the same GGUF file, float32 on CPU."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        smollm_gguf.parent, gguf_file=smollm_gguf.name, dtype=torch.float32).eval()
