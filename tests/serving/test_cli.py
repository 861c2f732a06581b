"""The `meshserve` command line, run as a user would: one error line and a non-zero exit on bad
input, never a traceback; and the default model answering a question."""

import io
import subprocess
import sys
from pathlib import Path

import pytest
from gguf import GGMLQuantizationType as Q

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
