"""Every GPU program builds for H100 and H200 targets (benchmarks/gpu_build.py, run with the GPU
machine's jax in .venv-gpu, which `make test` makes from locks/gpu-build.txt): a kernel or program
change that does not compile for the card fails here, not on the device. The whole build runs beside
the rest of the suite (conftest.BackgroundBuild); its test, last, reads what it built."""

import json
import subprocess

from tests.conftest import ROOT, gpu_venv_command


def gpu_venv(script: str, *args, timeout: int) -> subprocess.CompletedProcess:
    command, env = gpu_venv_command(script, *args)
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)


def gpu_build(*args, timeout: int) -> subprocess.CompletedProcess:
    return gpu_venv("gpu_build.py", *args, timeout=timeout)


def test_every_kernel_and_engine_program_builds_for_h100_and_h200(gpu_build):
    code, output = gpu_build.result(timeout=1500)
    print(output[-4000:])  # the table, in the log
    assert code == 0, output[-9000:]
    built = json.loads(gpu_build.json.read_text())
    names = {(b["target"], b["part"], b["name"]) for b in built}
    count = lambda target, part: sum(t == target and p == part for t, p, _ in names)
    assert count("h100", "kernels") == count("h200", "kernels") == 81  # every kernel call, for both cards
    # the H100: every program of the default model's 7 (shipped config) and the suite's 8B engine's 5;
    # the H200: the largest prefill and decode of each; both: those two of the 8B and 70B
    # tensor-parallel sets and of the 8B shape under the shipped config (its pool sized from the card's
    # memory); the H100: the largest two of Qwen3-30B-A3B (one card) and Qwen3-235B-A22B (experts over
    # 8), and of the default model with an fp8 KV cache, and its largest speculative verify program
    assert (count("h100", "engine"), count("h200", "engine")) == (25, 10)
    assert any("n-gram speculation" in n and ": verify rows=" in n for t, _, n in names if t == "h100")
    pages_of = lambda prefix: {int(n.split(", ")[-1].split(" KV pages")[0])
                               for t, _, n in names if t == "h100" and n.startswith(prefix)}
    shipped = [n for t, _, n in names if t == "h100" and n.startswith("Llama-3-8B shape, shipped config")]
    pages = pages_of("Llama-3-8B shape, shipped config")
    assert len(shipped) == 2 and len(pages) == 1 and min(pages) > 25_000  # ~28k pages of 2 MiB: 450k tokens
    # the default model's pool from the same memory: 65 bytes a token and kv head where float32 takes 256
    fp8, f32 = pages_of("default model, fp8 KV cache"), pages_of("default model, shipped config")
    assert len(fp8) == len(f32) == 1 and min(fp8) > 3.9 * min(f32)
    for target in ("h100", "h200"):
        kernels = [n for t, part, n in names if t == target and part == "kernels"]
        engine = [n for t, part, n in names if t == target and part == "engine"]
        assert any("gqa3" in n and n.startswith("ragged_prefill") for n in kernels)  # SmolLM2's 3 heads per kv head
        assert any("narrow-table" in n for n in kernels) and any(n.startswith("suite ") for n in kernels)
        for model in ("default model", "Llama-3-8B", "Llama-3-70B") + (
                ("Qwen3-30B-A3B", "Qwen3-235B-A22B") if target == "h100" else ()):
            assert any(n.startswith(model) or model in n for n in engine), model
        assert any("tensor=8" in n for n in engine)
    assert all(b["error"] is None for b in built)


def test_a_program_that_does_not_build_is_named_with_the_compilers_message():
    result = gpu_build("--targets", "h100", "--only", "kernels", "--match", "broken", "--broken", timeout=300)
    assert result.returncode == 1
    assert "FAIL h100 kernels: broken: a (3,) array" in result.stdout
    # Triton's own words, in the summary of failures too
    assert result.stdout.count("power of 2. Encountered an array of shape (3,)") == 2
    assert "0 of 1 programs built" in result.stdout


def test_the_next_ops_compile_for_an_h100_and_say_what_xla_made_of_them():
    """benchmarks/op_probe.py without a GPU, at its small shapes (the figures in docs/benchmarks.md
    are its full ones): the GPU suite's last step builds, and its verdicts come from the compiled HLO."""
    result = gpu_venv("op_probe.py", "--target", "h100", "--smoke", timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    found = [json.loads(line[len("FIGURES "):]) for line in result.stdout.splitlines() if line.startswith("FIGURES ")]
    assert not [f for f in found if f.get("error")]
    moe = {f["variant"]: f["work"] for f in found if f["op"] == "moe"}
    # XLA's default ragged_dot: every pair padded out to all 16 experts; capacity 2x the mean load: 2x
    assert moe == {"ragged_dot": 16, "ragged_dot fusion": 16, "capacity einsum (capacity 4)": 2}
    fp8 = {f["variant"]: f for f in found if f["op"] == "fp8"}
    assert fp8["fp8, Triton GEMMs off"]["cublaslt_f8"] is True  # the rewrite happens when cuBLAS is asked
    assert [f["m"] for f in found if f["op"] == "int8"] == [1, 8, 64]


def test_the_fp8_w8a8_matmul_compiles_to_cublaslt_fp8_gemm_for_an_h100():
    """Read from the compiled HLO of models/quant.dot at an 8B MLP's shape: cuBLASLt's fp8 GEMM for
    W8A8 fp8 with the engine's compiler options, a GEMM fusion (dequantizing in its prologue) for the
    weight-only formats; and without the options the check fails (Triton takes the fp8 dot)."""
    result = gpu_venv("gpu_quant_hlo.py", timeout=600)
    print(result.stdout[-3000:])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "h100 w8a8-fp8    256 rows: __cublas$lt$matmul$f8" in result.stdout
    assert "loop fusion" not in result.stdout  # every format's matmul is a GEMM
    without = gpu_venv("gpu_quant_hlo.py", "--without-options", timeout=600)
    assert without.returncode == 1 and "W8A8 fp8 uses cuBLASLt's fp8 GEMM (__cublas$lt$matmul$f8): NO" in without.stdout
