"""The GPU suite's table: each target of the first GPU run beside what was measured, from the
figures benchmarks/gpu_suite.sh collected (one JSON object per line).

    python benchmarks/gpu_summary.py figures.jsonl
"""

from __future__ import annotations

import json
import sys

VLLM_PUBLISHED = 6567  # output tok/s, 1×H100, Llama-3-8B bf16, ShareGPT 1000 prompts (vLLM PR #8804)
DECODE_TARGET_MS = {"H100": 5.3, "H200": 3.9}  # 8B-shaped decode step at batch 1 (≥ 85% of the roofline)


def main(path: str) -> None:
    rows = [json.loads(line) for line in open(path) if line.strip()]
    by = lambda part: [r for r in rows if r.get("part") == part]
    out = []

    def line(what, measured, target, ok):
        out.append((what, measured, target, "-" if ok is None else ("met" if ok else "missed")))

    for s in by("step"):
        line(f"step {s['step']}", f"exit {s['rc']}, {s['seconds']} s", "exit 0", s["rc"] == 0)
    for s in by("skipped"):
        line(f"step {s['step']}", "skipped", "run", False)
    kernels = [r for r in by("kernels") if "rate" in r]
    prefill = {r["variant"]: r["rate"] for r in kernels if r["family"] == "prefill"}
    ours = {k: v for k, v in prefill.items() if k.startswith("ours")}
    cudnn = prefill.get("jax.nn.dot_product_attention cudnn")
    if ours and cudnn:
        best = max(ours, key=ours.get)
        ratio = ours[best] / cudnn
        line("prefill attention vs cuDNN", f"{ours[best]:.0f} vs {cudnn:.0f} TFLOP/s = {ratio:.2f}x ({best[5:]})",
             ">= 1.2x", ratio >= 1.2)
    decode = {r["variant"]: r["rate"] for r in kernels if r["family"] == "decode" and r["variant"].startswith("ours")}
    if decode:
        best = max(decode, key=decode.get)
        line("paged decode attention", f"{decode[best]:.0f} GB/s of KV ({best[5:]})", ">= 2000 GB/s",
             decode[best] >= 2000)
    for r in by("decode"):
        target = next((t for name, t in DECODE_TARGET_MS.items() if name in r["card"]), None)
        pct = 100 * r["roofline_ms"] / r["program_ms"]
        measured = (f"{r['program_ms']:.2f} ms program, {r['step_ms']:.2f} ms engine step; roofline "
                    f"{r['roofline_ms']:.2f} ({pct:.0f}%), XLA weight stream {r['xla_weight_stream_ms']:.2f}")
        if r["batch"] == 1 and target is not None:
            line("8B decode step, batch 1", measured, f"<= {target} ms", r["program_ms"] <= target)
        else:
            line(f"8B decode step, batch {r['batch']}", measured, "-", None)
    engine, peer = by("throughput"), by("peer")
    if engine:
        e = engine[-1]
        line("8B chat mix", f"{e['output_tok_s']:.0f} tok/s; TTFT p50/p99 {e['ttft_p50_s']:.2f}/{e['ttft_p99_s']:.2f} s; "
             f"ITL p50/p99 {e['itl_p50_ms']:.1f}/{e['itl_p99_ms']:.1f} ms", f"vLLM published {VLLM_PUBLISHED}", None)
        if peer:
            ratio = e["output_tok_s"] / peer[-1]["output_tok_s"]
            line("engine vs transformers eager", f"{e['output_tok_s']:.0f} vs {peer[-1]['output_tok_s']:.0f} tok/s "
                 f"= {ratio:.1f}x", ">= 10x", ratio >= 10)
    for r in by("parity"):
        line("default model shape, GPU vs CPU", f"{r['tokens_equal']} of {r['of']} tokens ({r['attention']})",
             "equal", r["equal"])
    moe = {r["variant"]: r for r in by("ops") if r.get("op") == "moe" and "ms" in r}
    if moe:
        line("MoE grouped matmul (Qwen3-30B-A3B decode)",
             "; ".join(f"{name} {r['ms']:.3f} ms" for name, r in moe.items()), "for the next work", None)
    fp8 = [r for r in by("ops") if r.get("op") == "fp8"]
    if fp8:
        timing = next((r for r in fp8 if "fp8_ms" in r), None)
        calls = next((r for r in fp8 if "cublaslt_f8" in r), {})
        speed = f"; {timing['fp8_ms']:.2f} vs bf16 {timing['bf16_ms']:.2f} ms" if timing else ""
        line("fp8 matmul", f"cuBLASLt f8 GEMM: {calls.get('cublaslt_f8')}{speed}", "for the next work", None)
    int8 = [r for r in by("ops") if r.get("op") == "int8"]
    if int8:
        line("int8-weight matmul", "; ".join(
            f"M={r['m']} fused={r['fused']}" + (f" {r['int8_ms']:.3f} vs {r['bf16_ms']:.3f} ms" if "int8_ms" in r else "")
            for r in int8), "for the next work", None)
    width = max(len(r[0]) for r in out) if out else 10
    print(f"\n{'what':{width}}  {'measured':70}  {'target':17}  result")
    for what, measured, target, result in out:
        print(f"{what:{width}}  {measured:70}  {target:17}  {result}")


if __name__ == "__main__":
    main(sys.argv[1])
