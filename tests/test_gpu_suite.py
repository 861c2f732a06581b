"""The GPU suite's Python parts (benchmarks/engine_gpu.py, benchmarks/gpu_summary.py) run here at tiny
shapes, so what the GPU machine is handed is known to work; the summary's verdicts are exact."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*args) -> str:
    result = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_engine_parts_run_on_a_tiny_model(tmp_path):
    lines = []
    for part in ("engine", "peer", "parity"):
        out = run(ROOT / "benchmarks/engine_gpu.py", part, "--smoke", "--seconds", "2")
        lines += [line[len("FIGURES "):] for line in out.splitlines() if line.startswith("FIGURES ")]
    figures = [json.loads(line) for line in lines]
    decode = [f for f in figures if f["part"] == "decode"]
    assert [f["batch"] for f in decode] == [1, 4] and all(f["program_ms"] > 0 and f["step_ms"] > 0 for f in decode)
    mix = next(f for f in figures if f["part"] == "throughput")
    assert mix["requests_done"] > 0 and mix["output_tok_s"] > 0 and mix["itl_p99_ms"] >= mix["itl_p50_ms"]
    assert next(f for f in figures if f["part"] == "parity")["equal"] is True  # the engine = the dense forward
    (tmp_path / "figures.jsonl").write_text("\n".join(lines))
    table = run(ROOT / "benchmarks/gpu_summary.py", tmp_path / "figures.jsonl")
    assert "engine vs transformers eager" in table and "default model shape, GPU vs CPU" in table


def test_summary_verdicts(tmp_path):
    rows = [{"part": "step", "step": "a", "rc": 0, "seconds": 5},
            {"part": "kernels", "family": "prefill", "variant": "ours ragged_prefill bq=64", "rate": 250.0},
            {"part": "kernels", "family": "prefill", "variant": "jax.nn.dot_product_attention cudnn", "rate": 200.0},
            {"part": "kernels", "family": "decode", "variant": "ours paged_decode splits=8", "rate": 1900.0},
            {"part": "decode", "batch": 1, "card": "NVIDIA H200", "program_ms": 3.5, "step_ms": 3.9, "roofline_ms": 3.2,
             "xla_weight_stream_ms": 3.6},
            {"part": "throughput", "output_tok_s": 5000.0, "ttft_p50_s": 0.1, "ttft_p99_s": 0.5, "itl_p50_ms": 9.0,
             "itl_p99_ms": 20.0},
            {"part": "peer", "output_tok_s": 600.0},
            {"part": "parity", "tokens_equal": [16, 15], "of": 16, "attention": "pallas", "equal": False},
            {"part": "ops", "op": "fp8", "cublaslt_f8": True, "custom_calls": ["__cublas$lt$matmul$f8"]},
            {"part": "ops", "op": "int8", "m": 1, "fused": False}]
    (tmp_path / "f.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    table = {line.split("  ")[0].strip(): line.split()[-1] for line in run(ROOT / "benchmarks/gpu_summary.py",
                                                                           tmp_path / "f.jsonl").splitlines()[2:]}
    assert table == {"step a": "met", "prefill attention vs cuDNN": "met",  # 1.25x
                     "paged decode attention": "missed", "8B decode step, batch 1": "met",  # 3.5 <= 3.9 ms (H200)
                     "8B chat mix": "-", "engine vs transformers eager": "missed",  # 8.3x < 10x
                     "default model shape, GPU vs CPU": "missed", "fp8 matmul": "-", "int8-weight matmul": "-"}


def test_the_suite_fits_one_device_call():
    """The step limits add up to at most 540 s: one command of the GPU machine (600 s at most) with
    room for its start and the summary."""
    import re

    script = (ROOT / "benchmarks/gpu_suite.sh").read_text()
    mix = int(re.search(r'MIX_SECONDS="\$\{MIX_SECONDS:-(\d+)\}"', script)[1])
    limits = [sum(int(n) for n in limit.replace("MIX_SECONDS", str(mix)).strip("$()").split("+"))
              for limit in re.findall(r'^step "[^"]+" (\S+(?: \+ \d+\)\))?)', script, re.M)]
    assert len(limits) == 7 and sum(limits) <= 540, limits


def test_the_op_probe_runs_at_tiny_shapes():
    """benchmarks/op_probe.py (the suite's last step) at --smoke shapes on this CPU: every op measured
    and checked against its float32 reference."""
    out = run(ROOT / "benchmarks/op_probe.py", "--smoke")
    found = [json.loads(line[len("FIGURES "):]) for line in out.splitlines() if line.startswith("FIGURES ")]
    assert [f["op"] for f in found] == ["moe", "moe", "fp8", "int8", "int8", "int8"]
    assert all(f["rel_err"] < 2e-2 for f in found if f["op"] == "moe")
    assert all(f["int8_ms"] > 0 and f["bf16_ms"] > 0 for f in found if f["op"] == "int8")
