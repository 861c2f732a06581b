"""The `meshserve` command line, run as a user would: one error line and a non-zero exit on bad
input, never a traceback; and the default model answering a question."""

import io
import subprocess
import sys
from pathlib import Path

import pytest
from gguf import GGMLQuantizationType as Q
from jax.sharding import PartitionSpec as P

from tests.helpers import make_hf_model, write_gguf, write_unsupported_gguf


def meshserve(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "meshserve.serving.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)


def assert_one_error_line(result, *fragments):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("meshserve: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    model = make_hf_model("llama", root / "hf", max_shard_size="60KB", rope_scaling=None,
                          hidden_size=256, intermediate_size=512)
    write_gguf(root / "good.gguf", model, Q.Q8_0)
    full = (root / "good.gguf").read_bytes()
    (root / "cut.gguf").write_bytes(full[: len(full) // 2])
    write_unsupported_gguf(root / "q8_1.gguf")
    missing = root / "hf-missing-shard"
    import shutil
    shutil.copytree(root / "hf", missing)
    sorted(missing.glob("*.safetensors"))[-1].unlink()
    return root


@pytest.mark.parametrize("source,fragments", [
    ("gguf:{root}/absent.gguf", ["absent.gguf does not exist"]),
    ("gguf:{root}/cut.gguf", ["truncated"]),
    ("gguf:{root}/q8_1.gguf", ["tensor token_embd.weight has unsupported type Q8_1"]),
    ("hf:{root}/hf-missing-shard", ["missing shard", ".safetensors"]),
    ("hf:{root}/nothing-here", ["does not exist"]),
    ("onnx:{root}/model.onnx", ["--from must be gguf:FILE or hf:DIR"]),
])
def test_convert_bad_input(sources, tmp_path, source, fragments):
    result = meshserve("convert", "--from", source.format(root=sources), "--out", tmp_path / "out")
    assert_one_error_line(result, *fragments)
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == []  # no hidden partial folder either


def test_convert_refuses_existing_output(sources, tmp_path):
    (tmp_path / "out").mkdir()
    result = meshserve("convert", "--from", f"gguf:{sources}/good.gguf", "--out", tmp_path / "out")
    assert_one_error_line(result, "already exists")


def test_convert_then_generate(sources, tmp_path):
    result = meshserve("convert", "--from", f"hf:{sources}/hf", "--out", tmp_path / "ck", "--dtype", "bfloat16")
    assert result.returncode == 0, result.stderr
    result = meshserve("generate", "--model", tmp_path / "ck", "--max-tokens", "5", "--quiet", "the")
    assert result.returncode == 0, result.stderr


def test_convert_quantized_then_generate_and_a_mismatched_quantization(sources, tmp_path):
    """--quantize keeps the GGUF's Q8_0 blocks (config.yaml says so); generate runs it; asking a
    checkpoint for another format, or a format a model cannot take, is one error line."""
    result = meshserve("convert", "--from", f"gguf:{sources}/good.gguf", "--out", tmp_path / "ck", "--quantize", "q8_0")
    assert result.returncode == 0, result.stderr
    assert "quantization: q8_0" in (tmp_path / "ck" / "config.yaml").read_text()
    result = meshserve("generate", "--model", tmp_path / "ck", "--max-tokens", "3", "--quiet", "the")
    assert result.returncode == 0, result.stderr
    result = meshserve("generate", "--model", tmp_path / "ck", "--quantization", "int8", "--quiet", "the")
    assert_one_error_line(result, "holds q8_0 weights, not int8", "--quantize int8")
    result = meshserve("convert", "--from", f"hf:{sources}/hf", "--out", tmp_path / "big", "--quantize", "fp8-block")
    assert result.returncode == 0, result.stderr  # 128-wide blocks tile its 256/512-wide layers
    result = meshserve("convert", "--from", f"gguf:{sources}/good.gguf", "--out", tmp_path / "x", "--quantize", "int5")
    assert result.returncode != 0 and "invalid choice: 'int5'" in result.stderr


@pytest.mark.parametrize("flags,fragment", [
    (["--temperature", "-1"], "temperature must be >= 0"),
    (["--top-p", "0"], "top_p must be in (0, 1]"),
    (["--max-tokens", "0"], "max_tokens must be a positive integer"),
    (["--model", "/nonexistent/ckpt"], "model /nonexistent/ckpt does not exist"),
])
def test_generate_bad_input(smollm_ckpt, flags, fragment):
    args = ["--model", smollm_ckpt.path] if "--model" not in flags else []
    result = meshserve("generate", *args, *flags, "hello")
    assert_one_error_line(result, fragment)


def test_generate_too_long_for_the_context(smollm_ckpt):
    result = meshserve("generate", "--model", smollm_ckpt.path, "--quiet", "--max-seq-len", "64",
                       "--max-tokens", "60", "word " * 20)
    assert_one_error_line(result, "exceeds the context of 64 tokens")


def test_chat_answers_paris(smollm_ckpt):
    result = meshserve("generate", "--model", smollm_ckpt.path, "--chat", "--max-tokens", "40",
                       "What is the capital of France?")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


def test_progress_bars_on_a_terminal(sources, tmp_path, monkeypatch):
    from meshserve.models.checkpoint import load_checkpoint
    from meshserve.models.convert import convert

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    err = Terminal()
    monkeypatch.setattr(sys, "stderr", err)
    load_checkpoint(convert(f"gguf:{sources}/good.gguf", tmp_path / "ck"))
    text = err.getvalue()
    assert "converting" in text and "loading" in text and "100%" in text


def test_batch_mode(smollm_ckpt, tmp_path):
    import json

    src = tmp_path / "prompts.jsonl"
    src.write_text("\n".join(json.dumps(x) for x in [
        {"id": "fr", "messages": [{"role": "user", "content": "What is the capital of France?"}]},
        {"prompt": "The capital of Italy is", "max_tokens": 5},
        {"id": 3, "prompt": [1, 2, 3], "max_tokens": 3, "ignore_eos": True},
    ]) + "\n")
    result = meshserve("generate", "--model", smollm_ckpt.path, "--input", src, "--output",
                       tmp_path / "out.jsonl", "--max-tokens", "24", "--max-seq-len", "256", timeout=600)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["fr", 2, 3]
    assert "Paris" in rows[0]["text"]
    assert rows[1]["completion_tokens"] <= 5 and len(rows[2]["token_ids"]) == 3
    assert rows[2]["finish_reason"] == "length"
    assert "tok/s" in result.stderr


@pytest.mark.parametrize("content,fragment", [
    ('{"prompt": "a"}\nnot json\n', "line 2: not valid JSON"),
    ('{"prompt": "a", "messages": []}\n', 'line 1: need exactly one of "prompt" or "messages"'),
    ('{"prompt": "a", "colour": 1}\n', "line 1: unknown field(s) colour"),
    ('{"prompt": "a", "temperature": -1}\n', "line 1: temperature must be >= 0"),
    ('{"prompt": ""}\n', "line 1: prompt is empty"),
])
def test_batch_mode_bad_input(smollm_ckpt, tmp_path, content, fragment):
    src = tmp_path / "prompts.jsonl"
    src.write_text(content)
    result = meshserve("generate", "--model", smollm_ckpt.path, "--quiet", "--input", src, "--output",
                       tmp_path / "out.jsonl", "--max-seq-len", "64", "--max-tokens", "4")
    assert_one_error_line(result, fragment)
    assert not (tmp_path / "out.jsonl").exists()


def test_compilation_cache_folder_is_used(smollm_ckpt, tmp_path):
    import yaml

    config = yaml.safe_load(open(Path(__file__).resolve().parents[2] / "configs/serving/default.yaml"))
    config["engine"]["compilation_cache_dir"] = str(tmp_path / "xla")
    (tmp_path / "serving.yaml").write_text(yaml.safe_dump(config))
    result = meshserve("generate", "--model", smollm_ckpt.path, "--config", tmp_path / "serving.yaml",
                       "--quiet", "--max-tokens", "2", "hi")
    assert result.returncode == 0, result.stderr
    names = [p.name for p in (tmp_path / "xla").iterdir()]
    assert [n for n in names if n.startswith("meshserve-programs-")], names  # the step programs, saved whole


def test_bad_serving_config(smollm_ckpt, tmp_path):
    (tmp_path / "serving.yaml").write_text("engine:\n  page_size: 12\n")
    result = meshserve("generate", "--model", smollm_ckpt.path, "--config", tmp_path / "serving.yaml", "hi")
    assert_one_error_line(result, "page_size must be a power of two, got 12")
    (tmp_path / "serving.yaml").write_text("engine:\n  pages: 12\n")
    result = meshserve("generate", "--model", smollm_ckpt.path, "--config", tmp_path / "serving.yaml", "hi")
    assert_one_error_line(result, "unknown field(s) pages")


def test_engine_flags_win_over_the_config_file(monkeypatch):
    import os

    from meshserve.serving import cli

    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "unset")
    monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION")
    args = cli._parser().parse_args(["serve", "m.gguf", "--max-model-len", "4096", "--max-num-seqs", "600",
                                     "--gpu-memory-utilization", "0.8", "--kv-cache-memory", "2GiB",
                                     "--kv-cache-dtype", "int8", "--speculative-config",
                                     '{"method": "ngram", "num_speculative_tokens": 6}'])
    config = cli._engine_config(args)
    assert (config.speculative.method, config.speculative.num_speculative_tokens) == ("ngram", 6)
    assert (config.max_seq_len, config.max_num_seqs, config.gpu_memory_utilization, config.kv_cache_bytes,
            config.kv_cache_dtype) == (4096, 600, 0.8, 2 << 30, "int8")
    assert config.max_num_batched_tokens == 600  # a decode step of every sequence must fit a step
    assert os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.800"  # jax's GPU allocator takes that share
    shipped = cli._engine_config(cli._parser().parse_args(["serve"]))
    assert (shipped.max_seq_len, shipped.kv_cache_bytes, shipped.gpu_memory_utilization,
            shipped.kv_cache_dtype) == (2048, None, 0.9, "auto")


@pytest.mark.parametrize("text,size", [("4GiB", 4 << 30), ("512MiB", 512 << 20), ("1073741824", 1 << 30),
                                       ("2g", 2 * 10**9), ("1.5 GiB", 3 << 29)])
def test_sizes(text, size):
    from meshserve.serving.cli import _bytes

    assert _bytes(text) == size


@pytest.mark.parametrize("text", ["4 parsecs", "-1GiB", "0", "GiB", ""])
def test_bad_sizes(text):
    import argparse

    from meshserve.serving.cli import _bytes

    with pytest.raises(argparse.ArgumentTypeError):
        _bytes(text)


def test_parallel_sizes_make_a_mesh_without_a_file():
    from meshserve.models.errors import ConfigError
    from meshserve.serving.config import ServerConfig

    assert ServerConfig().mesh_config() is None
    assert ServerConfig(tensor_parallel_size=1, data_parallel_size=1).mesh_config() is None
    mesh = ServerConfig(tensor_parallel_size=4, data_parallel_size=2).mesh_config()
    assert dict(mesh.axes) == {"data": 2, "tensor": 4} and mesh.num_devices == 8
    layout = mesh.setup()  # the tests' 8 simulated CPU devices
    assert layout.describe() == "data=2 × tensor=4"
    with pytest.raises(ConfigError, match="a mesh file and tensor/data/expert parallel settings go apart"):
        ServerConfig(mesh="configs/meshes/cpu-8.yaml", tensor_parallel_size=2)
    with pytest.raises(ConfigError, match="a mesh file and tensor/data/expert parallel settings go apart"):
        ServerConfig(mesh="configs/meshes/cpu-8.yaml", enable_expert_parallel=True)
    # vLLM's --enable-expert-parallel: a mixture's experts over the tensor axis's devices, whole
    from meshserve.models.config import ModelConfig

    qwen = ModelConfig.named("qwen3-30b-a3b")
    ep = ServerConfig(tensor_parallel_size=8, enable_expert_parallel=True).mesh_config().setup().for_model(qwen)
    assert ep.experts(qwen, "cpu").shards == 8
    assert ep.spec(("expert", "embed", "mlp"), (128, 2048, 768)) == P("tensor", None, None)
    tp = ServerConfig(tensor_parallel_size=8).mesh_config().setup().for_model(qwen)
    assert tp.experts(qwen, "cpu").shards == 1 and tp.spec(("expert", "embed", "mlp"), (128, 2048, 768)) == P(None, None, "tensor")
    with pytest.raises(ConfigError, match="tensor_parallel_size must be a positive integer"):
        ServerConfig(tensor_parallel_size=0)


def test_sampling_defaults_of_the_server():
    from meshserve.models.errors import ConfigError
    from meshserve.serving.config import ServerConfig

    model = {"temperature": 0.6, "top_p": 0.9}
    assert ServerConfig().sampling_defaults(model) == model
    assert ServerConfig(generation_config="none").sampling_defaults(model) == {}
    over = ServerConfig(override_generation_config={"temperature": 0.2, "top_k": 5})
    assert over.sampling_defaults(model) == {"temperature": 0.2, "top_p": 0.9, "top_k": 5}
    with pytest.raises(ConfigError, match="server.override_generation_config: temperature must be a finite number"):
        ServerConfig(override_generation_config={"temperature": "warm"})
    with pytest.raises(ConfigError, match="generation_config must be auto or none"):
        ServerConfig(generation_config="vllm")


def test_serve_flag_mistakes_are_one_line(tmp_path):
    result = meshserve("serve", "--override-generation-config", "{temperature: 1}", "--quiet")
    assert_one_error_line(result, "--override-generation-config: not JSON")
    result = meshserve("serve", "--override-generation-config", '{"temprature": 1}', "--quiet")
    assert_one_error_line(result, "'temprature' is not a sampling default")
    result = meshserve("serve", "--speculative-config", '{"method": "ngram", "num_speculative_tokens": 16}', "--quiet")
    assert_one_error_line(result, r"speculative.num_speculative_tokens must be in [1, 15], got 16")
    result = meshserve("serve", "--speculative-config", "ngram", "--quiet")
    assert_one_error_line(result, "--speculative-config: not JSON")
    result = meshserve("serve", "--tensor-parallel-size", "2", "--quiet", "--port", "0", "--grpc-port", "0",
                       "--metrics-port", "0")  # over 2 of the tests' 8 simulated devices: 9 heads do not split
    assert_one_error_line(result, "q_heads: 9 cannot be split over mesh axis 'tensor' of size 2")
