"""A new user's first hour, as the README tells it: `meshserve serve` on the default model answering
the README's own examples, `meshserve serve MODEL` on a Hugging Face folder and a GGUF file (converted
once), and the mistakes a user makes, each one line and a non-zero exit."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
# a small engine, so the programs compile fast; every other setting as shipped
SMALL = ["--max-model-len", "256", "--max-num-seqs", "2", "--metrics-port", "0"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Serve:
    """`meshserve serve ARGS` in its own process, until its ready line (or its exit)."""

    def __init__(self, *args, env=None, timeout=300):
        self.http = free_port()
        self.proc = subprocess.Popen([sys.executable, "-m", "meshserve.serving.cli", "serve", *args,
                                      "--port", str(self.http), "--grpc-port", "0"],
                                     cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, **(env or {})})
        self.lines = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                raise AssertionError(f"serve exited {self.proc.wait()}: {''.join(self.lines)}")
            self.lines.append(line)
            if " ready: " in line:
                return
        raise AssertionError(f"not ready in {timeout} s: {''.join(self.lines)}")

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(timeout=60) == 0
        self.proc.stderr.close()


def test_the_readmes_examples_answer_paris_every_time():
    """The default model, the README's curl body and its Python example verbatim (no temperature: the
    model's sampling defaults), 10 times each: Paris every time; the stage lines and the ready line."""
    server = Serve(*SMALL)
    try:
        assert re.search(r"meshserve: (compiling programs 1/\d+ \(|\d+ programs read from the compilation cache)",
                         server.log), server.log
        assert "meshserve: KV cache: 35 pages of 16 tokens" in server.log  # 2 requests of 256 tokens, sized
        ready = server.log.strip().splitlines()[-1]
        assert ready.endswith(f"ready: OpenAI API http://127.0.0.1:{server.http}/v1 · "
                              f"model smollm2-135m-instruct-float32"), ready
        body = re.search(r"curl -s localhost:8000/v1/chat/completions .*? -d '(\{.*?\})'", README, re.S).group(1)
        python = re.search(r"```python\n(from openai import OpenAI.*?)```", README, re.S).group(1)
        python = python.replace("localhost:8000", f"127.0.0.1:{server.http}")
        answers = []
        for _ in range(10):
            request = urllib.request.Request(f"http://127.0.0.1:{server.http}/v1/chat/completions", body.encode(),
                                             {"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=60) as reply:
                answers.append(json.load(reply)["choices"][0]["message"]["content"])
            printed = subprocess.run([sys.executable, "-c", python], capture_output=True, text=True, timeout=60)
            assert printed.returncode == 0, printed.stderr
            answers.append(printed.stdout)
        assert all("Paris" in a for a in answers), answers
        with urllib.request.urlopen(f"http://127.0.0.1:{server.http}/v1/models", timeout=10) as reply:
            [model] = json.load(reply)["data"]
        assert model["sampling_defaults"] == {"temperature": 0.0}  # SmolLM2's generation config: greedy
    finally:
        server.stop()


def _greedy_text(model, tokenizer, ids, n):
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return tokenizer.decode(out[0, len(ids):].tolist())


def test_serve_a_hugging_face_folder_then_again_without_converting(tmp_path):
    import openai

    from tests.helpers import make_hf_model

    model = make_hf_model("llama", tmp_path / "tiny-llama", seed=11)
    (tmp_path / "tiny-llama" / "generation_config.json").write_text(json.dumps({"do_sample": False}))
    env = {"MESHSERVE_CACHE": str(tmp_path / "cache")}
    server = Serve(str(tmp_path / "tiny-llama"), *SMALL, env=env)
    try:
        assert "converting (hf) to float32" in server.log
        api = openai.OpenAI(base_url=f"http://127.0.0.1:{server.http}/v1", api_key="none")
        [served] = api.models.list().data
        assert served.id == "tiny-llama"  # the source's name, not its cached conversion's
        from meshserve.models.checkpoint import load_checkpoint

        [ckpt_dir] = (tmp_path / "cache" / "checkpoints").iterdir()
        tokenizer = load_checkpoint(ckpt_dir, progress=False).tokenizer
        ids = tokenizer.encode("hello world, ")
        reply = api.completions.create(model=served.id, prompt=ids, max_tokens=12, extra_body={"ignore_eos": True})
        assert reply.choices[0].text == _greedy_text(model, tokenizer, ids, 12)
    finally:
        server.stop()
    again = Serve(str(tmp_path / "tiny-llama"), *SMALL, env=env)
    again.stop()
    assert "converted before" in again.log and "converting" not in again.log
    assert len(list((tmp_path / "cache" / "checkpoints").iterdir())) == 1


def test_serve_the_default_gguf_file_matches_transformers(tmp_path, smollm_gguf, smollm_hf):
    import openai

    server = Serve(str(smollm_gguf), "--dtype", "float32", *SMALL, env={"MESHSERVE_CACHE": str(tmp_path)})
    try:
        assert "converting (gguf) to float32" in server.log
        api = openai.OpenAI(base_url=f"http://127.0.0.1:{server.http}/v1", api_key="none")
        [served] = api.models.list().data
        assert served.id == "SmolLM2-135M-Instruct.Q4_1"
        from meshserve.models.checkpoint import load_checkpoint

        [ckpt_dir] = (tmp_path / "checkpoints").iterdir()
        tokenizer = load_checkpoint(ckpt_dir, progress=False).tokenizer
        messages = [{"role": "user", "content": "Name three colours."}]
        reply = api.chat.completions.create(model=served.id, messages=messages, max_tokens=16,
                                            extra_body={"ignore_eos": True})
        ids = tokenizer.encode_chat(messages)
        assert reply.choices[0].message.content == _greedy_text(smollm_hf, tokenizer, ids, 16)
    finally:
        server.stop()


def _one_error_line(args, env=None) -> str:
    run = subprocess.run([sys.executable, "-m", "meshserve.serving.cli", *args], cwd=ROOT, capture_output=True,
                         text=True, timeout=180, env={**os.environ, **(env or {})})
    assert run.returncode == 1, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    return lines[0]


@pytest.mark.parametrize("flag,what", [("--port", "the OpenAI API"), ("--grpc-port", "gRPC"),
                                       ("--metrics-port", "metrics")])
def test_a_port_in_use_is_one_line_naming_the_flag(flag, what):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        ports = {"--port": str(free_port()), "--grpc-port": str(free_port()), "--metrics-port": str(free_port())}
        ports[flag] = str(port)
        line = _one_error_line(["serve", "--quiet", *[x for kv in ports.items() for x in kv]])
    assert line == (f"meshserve: error: {flag} {port}: 127.0.0.1:{port} is already in use ({what}); choose another "
                    f"port or stop what holds it")


def test_model_mistakes_are_one_line(tmp_path):
    assert _one_error_line(["serve", str(tmp_path / "absent.gguf"), "--quiet"]) == (
        f"meshserve: error: model {tmp_path / 'absent.gguf'} does not exist (give a GGUF file, a Hugging Face folder "
        f"or a meshserve checkpoint)")
    (tmp_path / "empty").mkdir()
    assert "neither config.json" in _one_error_line(["serve", str(tmp_path / "empty"), "--quiet"])
    assert _one_error_line(["serve", "--quiet", "--max-model-len", "8", "--port", str(free_port())]).startswith(
        "meshserve: error: max_seq_len must be >= page_size")
