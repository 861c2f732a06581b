"""Attention kernels against their peers, in one run, on bf16 random inputs; prints a table last.

  prefill  B=1, S=4096, 32 q / 8 kv heads, d=128, causal: ours (ragged_prefill over pages)
           vs cuDNN (jax.nn.dot_product_attention) vs XLA vs jax's shipped Pallas `mha`   [TFLOP/s]
  decode   B=64, context 4096, same heads, page size 16: ours (paged_decode) vs a plain XLA
           einsum vs jax's shipped `decode_attention.gqa` and `paged_attention`          [GB/s of KV]

Every variant is first checked against the float32 reference (relative L2 error printed). Figures
are medians over --iters runs after warm-up. Our kernels run at several settings (query block,
pages per tile, splits, Triton warps and stages): the table shows which to make the default. Each
row is also printed as a `FIGURES {json}` line (benchmarks/gpu_suite.sh collects them).

    python benchmarks/attention_kernels.py              # on a GPU
    python benchmarks/attention_kernels.py --smoke      # tiny shapes, Pallas interpreted on CPU: checks it runs
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import source_tree  # noqa: E402,F401  (meshserve from this checkout when not installed)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from meshserve.runtime.kernels.paged_decode import paged_decode  # noqa: E402
from meshserve.runtime.kernels.ragged_prefill import ragged_prefill  # noqa: E402
from meshserve.runtime.kernels.reference import paged_decode_reference, ragged_prefill_reference  # noqa: E402


# (query block, pages per tile, warps, stages) and (splits, pages per tile, warps, stages) tried;
# None: Triton's default. The engine's defaults are the first of each. Each must fit an H100/H200
# block's 232,448 B of shared memory (benchmarks/gpu_build.py builds them all): (128, 8, 8, 3), tried
# once, needs 262,176 B.
PREFILL_SETTINGS = [(16, 4, None, None), (64, 4, None, None), (64, 8, 4, 2), (64, 8, 8, 3), (128, 4, 4, 3)]
DECODE_SETTINGS = [(4, 4, None, None), (1, 4, None, None), (8, 4, None, None), (16, 4, None, None),
                   (8, 8, 4, 2), (16, 8, 4, 3), (16, 2, 4, 2), (32, 8, 4, 3)]


def timed(fn, iters: int) -> float:
    jax.block_until_ready(fn())  # compile + warm up
    jax.block_until_ready(fn())
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def rel_err(out, ref) -> float:
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def run(name, fn, ref, iters, work, unit, rows):
    family = "prefill" if unit == "TFLOP/s" else "decode"
    try:
        err = rel_err(fn(), ref)
        seconds = timed(fn, iters)
        rate = work / seconds / (1e12 if unit == "TFLOP/s" else 1e9)
        rows.append((name, f"{seconds * 1e3:.3f}", f"{rate:.4g}", unit, f"{err:.1e}"))
        print("FIGURES " + json.dumps({"part": "kernels", "family": family, "variant": name, "ms": seconds * 1e3,
                                       "rate": rate, "unit": unit, "rel_err": err}), flush=True)
    except Exception as e:  # a peer that does not run here is reported, not fatal
        rows.append((name, "-", "-", unit, f"failed: {type(e).__name__}: {str(e).splitlines()[0][:60]}"))
        print("FIGURES " + json.dumps({"part": "kernels", "family": family, "variant": name,
                                       "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}), flush=True)


PREFILL_SHAPE = dict(S=4096, H=32, K=8, D=128, ps=16)  # B = 1
DECODE_SHAPE = dict(B=64, ctx=4096, H=32, K=8, D=128, ps=16)


def prefill_inputs(S, H, K, D, ps, dt=jnp.bfloat16, rng=None):
    """(q [S, H, D], k, v [1, S, K, D] contiguous, k_pages, v_pages, table, first, start, length): one
    fresh prompt of S tokens over S / ps pages (page 0 the null page)."""
    rng = rng or np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((S, H, D)), dt)
    k = jnp.asarray(rng.standard_normal((1, S, K, D)), dt)
    v = jnp.asarray(rng.standard_normal((1, S, K, D)), dt)
    pages = S // ps
    to_pages = lambda x: jnp.concatenate([jnp.zeros((1, ps, K, D), dt), x[0].reshape(pages, ps, K, D)])
    table = jnp.arange(1, pages + 1, dtype=jnp.int32)[None]
    zero = jnp.zeros(1, jnp.int32)
    return q, k, v, to_pages(k), to_pages(v), table, zero, zero, jnp.full(1, S, jnp.int32)


def decode_inputs(B, ctx, H, K, D, ps, dt=jnp.bfloat16, rng=None):
    """(q [B, H, D], k_pages, v_pages, tables, lengths): B sequences of ctx tokens on shuffled pages."""
    rng = rng or np.random.default_rng(1)
    per_seq = ctx // ps
    kp = jnp.asarray(rng.standard_normal((B * per_seq + 1, ps, K, D)), dt)
    vp = jnp.asarray(rng.standard_normal((B * per_seq + 1, ps, K, D)), dt)
    tables = jnp.asarray(1 + rng.permutation(B * per_seq).reshape(B, per_seq), jnp.int32)
    q = jnp.asarray(rng.standard_normal((B, H, D)), dt)
    return q, kp, vp, tables, jnp.full(B, ctx, jnp.int32)


def kernel_calls():
    """(name, kernel, [(shape, dtype) of each array], keywords) of our kernels at every setting the
    suite times, at its shapes, for benchmarks/gpu_build.py."""
    S, H, K, D, ps = (PREFILL_SHAPE[n] for n in ("S", "H", "K", "D", "ps"))
    pages, dt = S // ps, jnp.bfloat16
    prefill_args = [((S, H, D), dt), ((pages + 1, ps, K, D), dt), ((pages + 1, ps, K, D), dt),
                    ((1, pages), jnp.int32), ((1,), jnp.int32), ((1,), jnp.int32), ((1,), jnp.int32)]
    for block_q, ppb, warps, stages in PREFILL_SETTINGS:
        yield (f"ragged_prefill bq={block_q} ppb={ppb} w={warps} s={stages}", ragged_prefill, prefill_args,
               dict(block_q=block_q, pages_per_block=ppb, num_warps=warps, num_stages=stages))
    B, ctx, H, K, D, ps = (DECODE_SHAPE[n] for n in ("B", "ctx", "H", "K", "D", "ps"))
    per_seq = ctx // ps
    decode_args = [((B, H, D), dt), ((B * per_seq + 1, ps, K, D), dt), ((B * per_seq + 1, ps, K, D), dt),
                   ((B, per_seq), jnp.int32), ((B,), jnp.int32)]
    for splits, ppb, warps, stages in DECODE_SETTINGS:
        yield (f"paged_decode splits={splits} ppb={ppb} w={warps} s={stages}", paged_decode, decode_args,
               dict(num_splits=splits, pages_per_block=ppb, num_warps=warps, num_stages=stages))


def prefill(args, rows, interpret):
    B, S, H, K, D = 1, args.seq, PREFILL_SHAPE["H"], PREFILL_SHAPE["K"], PREFILL_SHAPE["D"]
    q, k, v, kp, vp, table, first, start, length = prefill_inputs(S, H, K, D, PREFILL_SHAPE["ps"])
    ref = ragged_prefill_reference(q[None].astype(jnp.float32), kp.astype(jnp.float32), vp.astype(jnp.float32),
                                   table, start, length)[0]
    flops = 4 * B * H * S * S * D / 2  # causal: half the square
    scale = 1 / math.sqrt(D)
    for block_q, ppb, warps, stages in PREFILL_SETTINGS[:2 if interpret else None]:
        run(f"ours ragged_prefill bq={block_q} ppb={ppb} w={warps} s={stages}",
            lambda b=block_q, p=ppb, w=warps, st=stages: ragged_prefill(
                q, kp, vp, table, first, start, length, block_q=b, pages_per_block=p, num_warps=w, num_stages=st,
                interpret=interpret), ref, args.iters, flops, "TFLOP/s", rows)
    for impl in ("cudnn", "xla"):
        if impl == "cudnn" and interpret:
            continue
        run(f"jax.nn.dot_product_attention {impl}",
            lambda impl=impl: jax.nn.dot_product_attention(q[None], k, v, is_causal=True, implementation=impl)[0],
            ref, args.iters, flops, "TFLOP/s", rows)
    from jax.experimental.pallas.ops.gpu.attention import mha

    rep = lambda x: jnp.repeat(x, H // K, axis=2)  # shipped mha has no GQA
    kr, vr = rep(k), rep(v)
    run("jax shipped Pallas mha (K/V repeated)",
        lambda: mha(q[None], kr, vr, None, sm_scale=scale, causal=True, interpret=interpret)[0],
        ref, args.iters, flops, "TFLOP/s", rows)


def decode(args, rows, interpret):
    B, ctx, H, K, D, ps = args.batch, args.ctx, DECODE_SHAPE["H"], DECODE_SHAPE["K"], DECODE_SHAPE["D"], 16
    dt = jnp.bfloat16
    per_seq = ctx // ps
    q, kp, vp, tables, lengths = decode_inputs(B, ctx, H, K, D, ps, dt)
    ref = paged_decode_reference(q.astype(jnp.float32), kp.astype(jnp.float32), vp.astype(jnp.float32),
                                 tables, lengths)
    kv_bytes = 2 * B * ctx * K * D * jnp.dtype(dt).itemsize
    for splits, ppb, warps, stages in DECODE_SETTINGS[:2 if interpret else None]:
        run(f"ours paged_decode splits={splits} ppb={ppb} w={warps} s={stages}",
            lambda sp=splits, p=ppb, w=warps, st=stages: paged_decode(
                q, kp, vp, tables, lengths, num_splits=sp, pages_per_block=p, num_warps=w, num_stages=st,
                interpret=interpret), ref, args.iters, kv_bytes, "GB/s", rows)
    k = kp[tables].reshape(B, ctx, K, D)  # contiguous copies for the dense peers
    v = vp[tables].reshape(B, ctx, K, D)

    @jax.jit
    def xla(q, k, v):
        qg = q.reshape(B, K, H // K, D)
        s = jnp.einsum("bkgd,bskd->bkgs", qg, k, preferred_element_type=jnp.float32) / math.sqrt(D)
        p = jax.nn.softmax(s, axis=-1)
        return jnp.einsum("bkgs,bskd->bkgd", p.astype(v.dtype), v).reshape(B, H, D)

    run("XLA einsum (contiguous K/V)", lambda: xla(q, k, v), ref, args.iters, kv_bytes, "GB/s", rows)
    from jax.experimental.pallas.ops.gpu.decode_attention import gqa
    from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention

    splits = min(16, ctx // 16, per_seq)  # the shipped kernels' own constraints on tiny shapes
    run("jax shipped decode_attention.gqa", lambda: gqa(q, k, v, k_splits=splits, interpret=interpret),
        ref, args.iters, kv_bytes, "GB/s", rows)
    kh, vh = jnp.moveaxis(kp, 2, 0), jnp.moveaxis(vp, 2, 0)  # its layout: [K, N, page, D]
    qs = (q.astype(jnp.float32) / math.sqrt(D)).astype(dt)  # it applies no softmax scale itself
    run("jax shipped paged_attention",
        lambda: paged_attention(qs, kh, vh, tables, lengths, k_splits=splits, interpret=interpret),
        ref, args.iters, kv_bytes, "GB/s", rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="tiny shapes; Pallas interpreted (CPU)")
    ap.add_argument("--iters", type=int, default=50)
    args = ap.parse_args()
    interpret = jax.default_backend() != "gpu"
    if args.smoke:
        args.seq, args.batch, args.ctx, args.iters = 128, 2, 128, 2
    else:
        args.seq, args.batch, args.ctx = PREFILL_SHAPE["S"], DECODE_SHAPE["B"], DECODE_SHAPE["ctx"]
    rows: list[tuple] = []
    prefill(args, rows, interpret)
    decode(args, rows, interpret)
    device = jax.devices()[0]
    print(f"\ndevice: {getattr(device, 'device_kind', device.platform)}; jax {jax.__version__}; "
          f"prefill B=1 S={args.seq}; decode B={args.batch} ctx={args.ctx}; bf16; median of {args.iters}")
    print(f"{'variant':48} {'ms':>9} {'rate':>7} {'unit':8} rel.err vs f32 reference")
    for name, ms, rate, unit, err in rows:
        print(f"{name:48} {ms:>9} {rate:>7} {unit:8} {err}")


if __name__ == "__main__":
    main()
