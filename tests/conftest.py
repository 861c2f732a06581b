"""Shared fixtures. Tests run on CPU with 8 simulated devices, so sharded paths run here too."""

import os

# Must be set before jax is first imported; one device stays the default for unsharded work.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import subprocess  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GPU_BUILD_TEST = "tests/test_gpu_build.py::test_every_kernel_and_engine_program_builds_for_h100_and_h200"


def gpu_venv_command(script: str, *args) -> tuple[list[str], dict[str, str]]:
    """A script of benchmarks/ run with the GPU machine's jax (.venv-gpu, which `make test` makes
    from locks/gpu-build.txt), without this suite's CPU-only settings."""
    python = ROOT / ".venv-gpu" / "bin" / "python"
    assert python.exists(), "no .venv-gpu: `make test` makes it (locks/gpu-build.txt)"
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS", "PYTHONPATH")}
    return [str(python), str(ROOT / "benchmarks" / script), *map(str, args)], env


class BackgroundBuild:
    """benchmarks/gpu_build.py running beside the suite at the lowest CPU priority: the deviceless
    H100/H200 build (~10 minutes of XLA) takes the cores the other tests leave idle."""

    def __init__(self, folder: Path):
        self.json, self.log = folder / "built.json", folder / "build.log"
        command, env = gpu_venv_command("gpu_build.py", "--json", self.json)
        with self.log.open("w") as log:  # no preexec_fn: a fork of this (threaded) process runs no Python
            self.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        os.setpriority(os.PRIO_PROCESS, self.proc.pid, 19)

    def result(self, timeout: float) -> tuple[int, str]:
        """The build's exit code and output, once it has ended."""
        return self.proc.wait(timeout=timeout), self.log.read_text()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def pytest_collection_modifyitems(items):
    """The background build's test runs last, when the build has had the whole session."""
    items.sort(key=lambda item: item.nodeid == GPU_BUILD_TEST)


@pytest.fixture(scope="session", autouse=True)
def gpu_build(request, tmp_path_factory):
    """The BackgroundBuild, started with the session when its test is in it (else None)."""
    if not any(item.nodeid == GPU_BUILD_TEST for item in request.session.items):
        yield None
        return
    build = BackgroundBuild(tmp_path_factory.mktemp("gpu-build"))
    try:
        yield build
    finally:
        build.stop()


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
