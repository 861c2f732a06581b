"""What the next features would run on, measured on the card (the GPU suite's last step), and read
from the compiled HLO (which also works without a GPU: --target h100 builds for a compile-only one).

  moe    jax.lax.ragged_dot at Qwen3-30B-A3B decode shapes (2,048 hidden, 768 expert MLP, 128
         experts, top 8, 64 tokens): XLA's default lowering; the same with
         --xla_gpu_experimental_use_ragged_dot_fusion=true; a capacity-bucketed einsum over
         [experts, capacity, hidden]
  fp8    an e4m3 matmul (8192³, per-tensor scales, dequantize-then-dot as XLA's fp8 rewrite expects
         it) against bf16: time, and whether fp8 operands reach the GEMM (cuBLASLt's
         __cublas$lt$matmul$f8, or a GEMM fusion fed f8) or are widened to bf16 first; as XLA picks,
         and with its Triton GEMMs off (--xla_gpu_enable_triton_gemm=false)
  int8   int8 weights (per output channel scales) × bf16 activations at M = 1, 8, 64 (K = N = 4096)
         against bf16 weights: time, and whether the int8 weight reaches the GEMM (conversion fused)
         or is widened and written out first

XLA flags hold for a whole process: each flagged variant runs in a child process of this script.

    python benchmarks/op_probe.py [--iters 20]          # on a GPU; FIGURES lines, a table last
    python benchmarks/op_probe.py --target h100         # no GPU: only what the compiled HLO says
    python benchmarks/op_probe.py --smoke               # tiny shapes on any backend: checks the script
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

if "--target" in sys.argv:  # compile-only cards: the host's own backend must be the CPU's (before jax loads)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

SHAPES = dict(hidden=2048, expert_mlp=768, experts=128, top_k=8, tokens=64, matmul=8192, weights=4096)
SMOKE_SHAPES = dict(hidden=64, expert_mlp=32, experts=16, top_k=8, tokens=4, matmul=256, weights=256)
FLAGGED = {  # variant → the XLA flag its child process runs with
    "ragged_dot fusion": "--xla_gpu_experimental_use_ragged_dot_fusion=true",
    "fp8, Triton GEMMs off": "--xla_gpu_enable_triton_gemm=false",
}


def figures(**values) -> None:
    print("FIGURES " + json.dumps({"part": "ops", **values}), flush=True)


def timed(fn, *args, iters: int) -> float:
    """Median milliseconds of fn(*args) after a warm-up."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


class Probe:
    """Compiles for this process's device, or for a compile-only card (then nothing is timed)."""

    def __init__(self, target_key: str | None, iters: int, shapes: dict):
        self.iters, self.shapes = iters, shapes
        self.target = None
        if target_key:
            sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
            from gpu_build import Target

            self.target = Target(target_key)

    def compiled_text(self, fn, *args) -> str:
        if self.target is None:
            return fn.lower(*args).compile().as_text()
        from jax.sharding import Mesh, NamedSharding, PartitionSpec

        sharding = NamedSharding(Mesh([self.target.devices[0]], ("x",)), PartitionSpec())
        abstract = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding) for a in args]
        with jax.sharding.use_abstract_mesh(self.target.abstract_mesh()):
            return fn.trace(*abstract).lower().compile().as_text()

    def time(self, fn, *args) -> float | None:
        return None if self.target else timed(fn, *args, iters=self.iters)


def gemm_operands(compiled_text: str) -> list[tuple[str, list[str]]]:
    """(kind, types of its operands, e.g. "bf16[512,2048]") of each GEMM of the entry computation: a
    cuBLAS(Lt) custom call (kind: its target) or a GEMM fusion (kind: "fusion")."""
    entry = compiled_text[compiled_text.index("\nENTRY"):]
    types = dict(re.findall(r"%([\w.\-]+) = (\w+\[[\d,]*\])", entry))
    types.update(re.findall(r"([\w.\-]+): (\w+\[[\d,]*\])", entry.splitlines()[1]))  # the entry's parameters
    found = []
    for line in entry.splitlines():
        call = re.search(r'custom_call_target="(__cublas[^"]*)"', line)
        if call or "gemm_fusion" in line.split("=")[0]:
            args = re.search(r"(?:custom-call|fusion)\(([^)]*)\)", line)
            names = [a.strip().lstrip("%") for a in args[1].split(",")] if args else []
            found.append((call[1] if call else "fusion", [types.get(n, "?") for n in names]))
    return found


# ---- moe ---------------------------------------------------------------------------------------------

def elements(type_: str) -> int:
    return int(np.prod([int(d) for d in re.findall(r"\d+", type_.split("[", 1)[1])]))


def moe_inputs(s: dict):
    """Token-expert pairs sorted by expert (what a dropless MoE hands the grouped matmul)."""
    rng = np.random.default_rng(0)
    pairs = s["tokens"] * s["top_k"]
    experts = np.sort(rng.integers(0, s["experts"], pairs))
    sizes = np.bincount(experts, minlength=s["experts"]).astype(np.int32)
    lhs = jnp.asarray(rng.standard_normal((pairs, s["hidden"])), jnp.bfloat16)
    rhs = jnp.asarray(rng.standard_normal((s["experts"], s["hidden"], s["expert_mlp"])) * 0.02, jnp.bfloat16)
    return lhs, rhs, jnp.asarray(sizes), jnp.asarray(experts, jnp.int32)


def moe_reference(lhs, rhs, experts):
    """Each pair times its expert's matrix, in float32 on the host."""
    lhs, rhs, experts = np.asarray(lhs, np.float32), np.asarray(rhs, np.float32), np.asarray(experts)
    out = np.zeros((lhs.shape[0], rhs.shape[2]), np.float32)
    for e in np.unique(experts):
        out[experts == e] = lhs[experts == e] @ rhs[e]
    return out


@jax.jit
def ragged(lhs, rhs, sizes):
    return jax.lax.ragged_dot(lhs, rhs, sizes, preferred_element_type=jnp.float32).astype(jnp.bfloat16)


def capacity_einsum(num_experts: int, capacity: int):
    @jax.jit
    def run(lhs, rhs, experts):
        """Each expert's pairs in a fixed [capacity] slot list (dropped past it), one batched matmul."""
        first = jnp.searchsorted(experts, jnp.arange(num_experts, dtype=jnp.int32))
        slot = jnp.arange(experts.shape[0], dtype=jnp.int32) - first[experts]
        keep = slot < capacity
        buckets = jnp.zeros((num_experts, capacity, lhs.shape[1]), lhs.dtype)
        buckets = buckets.at[experts, jnp.where(keep, slot, capacity)].set(lhs, mode="drop")
        out = jnp.einsum("ecd,edf->ecf", buckets, rhs, preferred_element_type=jnp.float32).astype(lhs.dtype)
        return jnp.where(keep[:, None], out[experts, jnp.minimum(slot, capacity - 1)], 0)
    return run


def moe(probe: Probe, variants: list[str]) -> None:
    s = probe.shapes
    lhs, rhs, sizes, experts = moe_inputs(s)
    capacity = 2 * -(-s["tokens"] * s["top_k"] // s["experts"])
    ref = None if probe.target else moe_reference(lhs, rhs, experts)
    runs = {"ragged_dot": (ragged, (lhs, rhs, sizes)), "ragged_dot fusion": (ragged, (lhs, rhs, sizes)),
            f"capacity einsum (capacity {capacity})": (capacity_einsum(s["experts"], capacity), (lhs, rhs, experts))}
    for name in variants:
        if name.startswith("capacity"):
            name = next(n for n in runs if n.startswith("capacity"))
        fn, args = runs[name]
        gemms = gemm_operands(probe.compiled_text(fn, *args))
        # the rows the GEMMs multiply, over the token-expert pairs' own: 1 for a grouped GEMM; the number
        # of experts for a lowering that pads every pair out to all of them
        work = sum(elements(ts[0]) for _, ts in gemms if ts and ts[0] != "?") / lhs.size if gemms else None
        ms = probe.time(fn, *args)
        values = dict(op="moe", variant=name, gemms=gemms, work=work)
        if ms is not None:
            out = np.asarray(fn(*args), np.float32)
            kept = np.abs(out).sum(axis=1) > 0  # the capacity einsum drops what overflows its slots
            values.update(ms=ms, gbps=rhs.nbytes / ms / 1e6,  # every expert touched: its weights read once
                          rel_err=float(np.linalg.norm(out[kept] - ref[kept]) / np.linalg.norm(ref[kept])),
                          dropped=int((~kept).sum()))
        figures(**values)


# ---- fp8 and int8 --------------------------------------------------------------------------------------

def fp8_matmul(a8, b8, scale_a, scale_b):
    """Dequantize (convert, scale), then dot: the pattern XLA rewrites to cuBLASLt's fp8 GEMM."""
    a = a8.astype(jnp.bfloat16) * scale_a.astype(jnp.bfloat16)
    b = b8.astype(jnp.bfloat16) * scale_b.astype(jnp.bfloat16)
    return jnp.dot(a, b, preferred_element_type=jnp.bfloat16)


def int8_matmul(x, w8, scale):
    return jnp.dot(x, w8.astype(jnp.bfloat16), preferred_element_type=jnp.float32).astype(jnp.bfloat16) * scale


def bf16_matmul(x, w):
    return jnp.dot(x, w, preferred_element_type=jnp.bfloat16)


def fp8(probe: Probe, variant: str) -> None:
    n = probe.shapes["matmul"]
    rng = np.random.default_rng(1)
    a = jnp.asarray(rng.standard_normal((n, n)), jnp.float32)
    b = jnp.asarray(rng.standard_normal((n, n)), jnp.float32)
    scale_a, scale_b = jnp.max(jnp.abs(a)) / 448, jnp.max(jnp.abs(b)) / 448  # e4m3's largest is 448
    a8, b8 = (a / scale_a).astype(jnp.float8_e4m3fn), (b / scale_b).astype(jnp.float8_e4m3fn)
    fn = jax.jit(fp8_matmul)
    gemms = gemm_operands(probe.compiled_text(fn, a8, b8, scale_a, scale_b))
    values = dict(op="fp8", variant=variant, gemms=gemms,
                  cublaslt_f8=any(kind.endswith("$f8") for kind, _ in gemms),
                  f8_reaches_gemm=any(any(t.startswith("f8") for t in ts) for _, ts in gemms))
    ms = probe.time(fn, a8, b8, scale_a, scale_b)
    if ms is not None:
        ref = np.asarray(jnp.dot(a, b, precision="highest"))
        out = np.asarray(fn(a8, b8, scale_a, scale_b), np.float32)
        bf16 = probe.time(jax.jit(bf16_matmul), a.astype(jnp.bfloat16), b.astype(jnp.bfloat16))
        values.update(fp8_ms=ms, bf16_ms=bf16, tflops=2 * n ** 3 / ms / 1e9,
                      rel_err=float(np.linalg.norm(out - ref) / np.linalg.norm(ref)))
    figures(**values)


def int8(probe: Probe) -> None:
    k = probe.shapes["weights"]
    rng = np.random.default_rng(2)
    w = jnp.asarray(rng.standard_normal((k, k)) * 0.02, jnp.float32)
    scale = jnp.max(jnp.abs(w), axis=0) / 127
    w8, scale16 = jnp.round(w / scale).astype(jnp.int8), scale.astype(jnp.bfloat16)
    fn = jax.jit(int8_matmul)
    for m in (1, 8, 64):
        x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
        gemms = gemm_operands(probe.compiled_text(fn, x, w8, scale16))
        values = dict(op="int8", m=m, gemms=gemms, fused=any(any(t.startswith("s8") for t in ts) for _, ts in gemms))
        ms = probe.time(fn, x, w8, scale16)
        if ms is not None:
            values.update(int8_ms=ms, bf16_ms=probe.time(jax.jit(bf16_matmul), x, w.astype(jnp.bfloat16)))
        figures(**values)


def run(probe: Probe, variants: list[str]) -> None:
    for variant in variants:
        if variant.startswith(("ragged_dot", "capacity")):
            moe(probe, [variant])
        elif variant.startswith("fp8"):
            fp8(probe, variant)
        elif variant == "int8":
            int8(probe)


def in_child(variant: str, argv: list[str]) -> list[dict]:
    """A flagged variant in its own process (XLA's flags are per process); its FIGURES."""
    env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {FLAGGED[variant]}".strip()}
    child = subprocess.run([sys.executable, os.path.abspath(__file__), *argv, "--only", variant],
                           capture_output=True, text=True, timeout=150, env=env)
    found = [json.loads(line[len("FIGURES "):]) for line in child.stdout.splitlines() if line.startswith("FIGURES ")]
    if child.returncode or not found:
        found = [dict(part="ops", op=variant.split(",")[0].split()[0], variant=variant,
                      error=(child.stderr or child.stdout)[-600:])]
    for values in found:
        print("FIGURES " + json.dumps(values), flush=True)
    return found


def table(rows: list[dict], kind: str, iters: int) -> None:
    print(f"\n{kind}; jax {jax.__version__}; median of {iters}")
    print(f"{'op':6}{'variant':34}{'ms':>9}  note")
    for r in rows:
        ms = r.get("ms", r.get("fp8_ms", r.get("int8_ms")))
        if r.get("error"):
            note = f"failed: {r['error'].strip().splitlines()[-1][:80]}"
        elif r["op"] == "moe":
            note = ("no GEMM kernel (a CPU's dot)" if r["work"] is None else f"GEMM over {r['work']:.0f}x the pairs' rows") + (
                f", {r['gbps']:.0f} GB/s of weights, rel.err {r['rel_err']:.1e}, {r['dropped']} dropped"
                if "gbps" in r else "")
        elif r["op"] == "fp8":
            note = f"cuBLASLt f8 {r['cublaslt_f8']}, f8 reaches the GEMM {r['f8_reaches_gemm']}" + (
                f"; bf16 {r['bf16_ms']:.3f} ms" if r.get("bf16_ms") else "")
        else:
            note = f"M={r['m']}: int8 reaches the GEMM {r['fused']}" + (
                f"; bf16 weights {r['bf16_ms']:.3f} ms" if r.get("bf16_ms") else "")
        name = r.get("variant", "int8 weights")
        print(f"{r['op']:6}{name:34}{'-' if ms is None else f'{ms:.3f}':>9}  {note}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--target", default=None, help="h100 or h200: no GPU, only the compiled HLO's verdicts")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on any backend (flagged variants: with --target)")
    ap.add_argument("--only", default=None, help=argparse.SUPPRESS)  # one variant (a child process)
    args = ap.parse_args()
    probe = Probe(args.target, 2 if args.smoke else args.iters, SMOKE_SHAPES if args.smoke else SHAPES)
    if args.only:
        return run(probe, [args.only])
    argv = (["--iters", str(args.iters)] + (["--target", args.target] if args.target else [])
            + (["--smoke"] if args.smoke else []))
    rows: list[dict] = []
    capture = lambda: [json.loads(l[len("FIGURES "):]) for l in out.getvalue().splitlines() if l.startswith("FIGURES ")]
    import contextlib
    import io

    for variant in ("ragged_dot", "ragged_dot fusion", "capacity", "fp8, as XLA picks", "fp8, Triton GEMMs off", "int8"):
        if variant in FLAGGED:
            if args.target or not args.smoke:  # the flags are the GPU backend's
                rows += in_child(variant, argv)
            continue
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            run(probe, [variant])
        print(out.getvalue(), end="", flush=True)
        rows += capture()
    table(rows, args.target or jax.devices()[0].device_kind, probe.iters)


if __name__ == "__main__":
    main()
