"""`meshserve serve` as users run it: the default model, gRPC and HTTP clients asking it, SIGTERM."""

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from meshserve.serving.client import Client

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_answers_paris_then_stops_on_sigterm(smollm_ckpt, tmp_path):
    config = yaml.safe_load((ROOT / "configs/serving/default.yaml").read_text())
    # few programs to compile, so the test starts fast; the rest as shipped
    config["engine"].update(max_seq_len=256, max_num_seqs=2, max_prefill_chunk=64, prefill_buckets=[64],
                            decode_buckets=[2], context_buckets=[16], compilation_cache_dir=None)
    port, http_port = free_port(), free_port()
    config["server"].update(port=port, metrics_port=None, http_port=http_port, model=str(smollm_ckpt.path))
    path = tmp_path / "serving.yaml"
    path.write_text(yaml.safe_dump(config))
    server = subprocess.Popen([sys.executable, "-m", "meshserve.serving.cli", "serve", "--config", str(path), "--quiet"],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        with Client(f"127.0.0.1:{port}") as c:
            c.wait_serving(timeout=300)
        answer = subprocess.run([sys.executable, "-m", "meshserve.serving.cli", "generate", "--server", f"localhost:{port}",
                                 "--chat", "--max-tokens", "16", "What is the capital of France?"],
                                cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert answer.returncode == 0, answer.stderr
        assert "Paris" in answer.stdout
        import openai  # the same server, over its OpenAI-compatible HTTP API

        api = openai.OpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key="none")
        model = api.models.list().data[0].id
        assert model == smollm_ckpt.path.name  # the checkpoint folder names the model
        chat = api.chat.completions.create(model=model, messages=[{"role": "user", "content": "What is the capital "
                                                                   "of France?"}], max_tokens=16, temperature=0)
        assert "Paris" in chat.choices[0].message.content
        bad = subprocess.run([sys.executable, "-m", "meshserve.serving.cli", "generate", "--server", f"localhost:{port}",
                              "--temperature", "-1", "hi"], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert bad.returncode == 1
        assert bad.stderr.strip().splitlines() == [
            f"meshserve: error: localhost:{port}: INVALID_ARGUMENT: temperature must be >= 0, got -1.0"]
        t0 = time.monotonic()
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
        assert server.returncode == 0 and time.monotonic() - t0 < 60
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def test_serve_over_two_processes(tiny_ckpt, tiny_ckpt_dir, tmp_path):
    """A mesh file over 2 processes × 4 CPU devices: process 0 listens (HTTP only: `--grpc-port 0`),
    process 1 replays its turns; greedy tokens equal the dense no-cache forward pass; SIGTERM to
    process 0 stops both."""
    import json
    import os
    import urllib.request

    from tests.runtime.conftest import greedy_reference

    mesh = tmp_path / "mesh.yaml"
    mesh.write_text(yaml.safe_dump({"platform": "cpu", "cpu_devices": 4, "axes": {"data": 1, "tensor": 8},
                                    "distributed": {"coordinator_address": f"127.0.0.1:{free_port()}",
                                                    "num_processes": 2, "process_id": "env:MESHSERVE_PROCESS_ID",
                                                    "initialization_timeout_s": 120}}))
    config = yaml.safe_load((ROOT / "configs/serving/default.yaml").read_text())
    config["engine"].update(max_seq_len=128, max_num_seqs=2, kv_cache_bytes=2**20, host_kv_bytes=0,
                            compilation_cache_dir=None)
    http_port, grpc_port = free_port(), free_port()
    config["server"].update(port=grpc_port, metrics_port=None, http_port=http_port, model=str(tiny_ckpt_dir),
                            mesh=str(mesh))
    (tmp_path / "serving.yaml").write_text(yaml.safe_dump(config))
    procs = [subprocess.Popen([sys.executable, "-m", "meshserve.serving.cli", "serve", "--config",
                               str(tmp_path / "serving.yaml"), "--grpc-port", "0", "--quiet"], cwd=ROOT,
                              stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "MESHSERVE_PROCESS_ID": str(i), "JAX_PLATFORMS": "cpu"})
             for i in (1, 0)]
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{http_port}/health", timeout=2).status == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "the servers did not start"
            time.sleep(0.5)
        for prompt in ([5, 6, 7, 8], [40, 41] * 9):
            body = json.dumps({"model": tiny_ckpt_dir.name, "prompt": prompt, "max_tokens": 12, "temperature": 0,
                               "ignore_eos": True}).encode()
            request = urllib.request.Request(f"http://127.0.0.1:{http_port}/v1/completions", body,
                                             {"content-type": "application/json"})
            answer = json.load(urllib.request.urlopen(request, timeout=120))
            assert answer["choices"][0]["text"] == tiny_ckpt.tokenizer.decode(greedy_reference(tiny_ckpt, prompt, 12))
        with socket.socket() as s, pytest.raises(ConnectionRefusedError):  # the config's gRPC port stays closed
            s.connect(("127.0.0.1", grpc_port))
        procs[1].send_signal(signal.SIGTERM)
        assert procs[1].wait(timeout=60) == 0 and procs[0].wait(timeout=60) == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
