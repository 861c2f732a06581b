"""Which GEMM each quantized matmul becomes on an H100, read from the compiled HLO without a GPU.

Compiles models/quant.py's `dot` for each format at an 8B model's MLP shape (4096 → 14336, bf16
activations, 16 and 256 rows) for compile-only H100 devices (benchmarks/gpu_build.py's targets) and
prints the GEMM custom calls XLA chose. On Hopper, XLA rewrites a dot of fp8 operands into cuBLASLt's
fp8 GEMM (`__cublas$lt$matmul$f8`) only when the pattern matches exactly, and that has regressed
before; and with Triton's GEMM fusion on, a build that cannot autotune gives fp8 dots to Triton
(models/quant.compiler_options turns it off for the fp8 formats). Each is compiled with the options
the engine gives its programs; the run fails when the W8A8 fp8 matmul does not contain that call.

    .venv-gpu/bin/python benchmarks/gpu_quant_hlo.py [--without-options]

--without-options: compile without the engine's options (the check must then fail: Triton takes them).
"""

from __future__ import annotations

import re
import sys

from gpu_build import Target  # noqa: E402  (sets up jax for compile-only GPU devices)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

from meshserve.models import quant  # noqa: E402

D, F = 4096, 14336
FP8_GEMM = "__cublas$lt$matmul$f8"


def gemm_calls(hlo: str) -> list[str]:
    """The GEMM-like custom calls and fusions in compiled HLO text, in order of appearance."""
    calls = re.findall(r'custom_call_target="([^"]+)"', hlo)
    kinds = re.findall(r'"kind":"(__triton_gemm|__cudnn\$fusion|__triton_nested_gemm_fusion)"', hlo)
    return [c for c in calls if "matmul" in c or "gemm" in c.lower() or "cudnn" in c] + kinds


def main() -> int:
    without = "--without-options" in sys.argv[1:]
    target = Target("h100")
    sharding = NamedSharding(Mesh([target.devices[0]], ("x",)), PartitionSpec())
    found = {}
    for fmt in ("w8a8-fp8", "w8a8", "fp8", "int8", "int4-g128"):
        g = quant.Geometry((D, F), 0, 1, quant.get_format(fmt))
        parts = {"q": jax.ShapeDtypeStruct(g.q_shape, g.q_dtype, sharding=sharding),
                 "scale": jax.ShapeDtypeStruct(g.scale_shape, jnp.float32, sharding=sharding)}
        if g.format.zero:
            parts["zero"] = parts["scale"]
        for rows in (16, 256):
            x = jax.ShapeDtypeStruct((rows, D), jnp.bfloat16, sharding=sharding)
            lowered = jax.jit(lambda x, p, g=g: quant.dot(x, p, g)).trace(x, parts).lower()
            compiled = lowered.compile(None if without else quant.compiler_options(fmt, "gpu") or None)
            calls = gemm_calls(compiled.as_text())
            found[fmt, rows] = calls
            print(f"h100 {fmt:10} {rows:4} rows: {', '.join(calls) or 'no GEMM call (a loop fusion)'}", flush=True)
    ok = all(FP8_GEMM in found["w8a8-fp8", rows] for rows in (16, 256))
    print(f"W8A8 fp8 uses cuBLASLt's fp8 GEMM ({FP8_GEMM}): {'yes' if ok else 'NO'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
