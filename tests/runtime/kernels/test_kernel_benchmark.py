"""The GPU kernel benchmark runs end to end on CPU at tiny shapes (Pallas interpreted), so the script
handed to the GPU machine is known to work, and every variant is correct there."""

import json
import subprocess
import sys
from pathlib import Path

import jax

ROOT = Path(__file__).resolve().parents[3]


def test_smoke_run_is_correct():
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks/attention_kernels.py"), "--smoke"], capture_output=True,
                            text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line[len("FIGURES "):]) for line in result.stdout.splitlines() if line.startswith("FIGURES ")]
    names = [r["variant"] for r in rows]
    interpreted = jax.default_backend() != "gpu"
    assert sum(n.startswith("ours ragged_prefill") for n in names) == (2 if interpreted else 6)
    assert sum(n.startswith("ours paged_decode") for n in names) == (2 if interpreted else 8)
    assert {"jax.nn.dot_product_attention xla", "jax shipped Pallas mha (K/V repeated)", "XLA einsum (contiguous K/V)",
            "jax shipped decode_attention.gqa", "jax shipped paged_attention"} <= set(names)
    assert ("jax.nn.dot_product_attention cudnn" in names) != interpreted  # cuDNN needs a GPU
    for row in rows:
        assert "error" not in row, row
        assert row["rel_err"] < 5e-3, row  # bf16 against the f32 reference
    assert len(result.stdout.splitlines()[-1].split()) >= 5  # the table is printed last
