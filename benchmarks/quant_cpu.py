"""Quantized weights on CPU: accuracy and speed of each format against float32, on the default model,
in one run.

Accuracy: the model scores 1,000 tokens of this repository's own English (README.md and docs/) in
one forward per format; top-1 agreement of the next-token predictions with float32's, and the mean
KL divergence KL(float32 ‖ format) of the next-token distributions.
Speed: the engine's batch-1 decode tokens/s (64-token prompt; time of 64 new tokens minus time of
1) and the aggregate tokens/s of 16 concurrent requests (64-token prompts, 64 new tokens, greedy,
prefill included); each the median of --repeats runs; ratios against float32 measured in this run.
Weights are quantized from the float32 checkpoint of the default model (itself the GGUF's Q4_1
blocks, dequantized: so q4_1 recovers them exactly).
Where the time goes: the linear layers alone (the 30 layers' seven matrices and the vocabulary head,
one decode row) through each path, with the bytes each reads per step and the rate that makes.
KV cache dtypes (float32 weights): the same accuracy figures, from the forward pass whose keys and
values are quantized as an int8 / fp8 pool stores them (runtime/kv_quant.QuantizedAttention: what
the engine computes, tests/runtime/test_kv_quant.py); and a pool-bound workload: 32 requests
(64-token prompts, 64 new tokens) at once through a KV pool of the same bytes for every dtype, sized
to hold 8 of them in float32: output tokens/s, and how many ran at once at most.

    .venv/bin/python benchmarks/quant_cpu.py [--formats int8,w8a8,...] [--kv-dtypes int8,fp8] [--repeats 3]
                                             [--linears-only | --kv-only]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time
from pathlib import Path

import numpy as np

import source_tree  # noqa: F401  (meshserve from this checkout when not installed)

ROOT = Path(__file__).resolve().parents[1]
SCORED, PROMPT, NEW, CONCURRENT = 1000, 64, 64, 16
DEFAULT_FORMATS = "int8,w8a8,fp8,w8a8-fp8,int4-g32,q8_0,q4_1"
POOL_REQUESTS, POOL_HOLDS = 32, 8  # the pool-bound workload: requests, and how many a float32 pool holds


def corpus_tokens(tokenizer, n: int) -> list[int]:
    text = "\n\n".join(p.read_text() for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))])
    ids = tokenizer.encode(text)
    assert len(ids) > n, "not enough text to score"
    return ids[:n + 1]


def accuracy(params, config, reference_logp, tokens) -> tuple[float, float]:
    return _agreement(_scores(params, config, tokens), reference_logp)


def _scores(params, config, tokens, kv_dtype=None):
    """Every position's logits; with kv_dtype, keys and values quantized as such a pool holds them."""
    import jax
    import jax.numpy as jnp

    from meshserve.models.decoder import forward
    from meshserve.runtime.kv_quant import QuantizedAttention

    ids = jnp.asarray([tokens[:-1]])
    positions = jnp.arange(ids.shape[1])[None]
    cache = None if kv_dtype is None else QuantizedAttention(kv_dtype)
    return jax.jit(lambda p: forward(p, ids, positions, cache, config=config)[0][0])(params)


def pool_bound(ckpt, kv_cache_dtype: str, repeats: int) -> tuple[float, int]:
    """Output tokens/s of POOL_REQUESTS requests through a pool of POOL_HOLDS float32 requests'
    bytes (median of `repeats`), and the most requests that ran at once."""
    from meshserve.models.default import cache_dir
    from meshserve.runtime.engine import Engine, EngineConfig
    from meshserve.runtime.kv_cache import page_bytes
    from meshserve.runtime.sampling import SamplingParams

    ps = 16
    pages = POOL_HOLDS * ((PROMPT + NEW) // ps + 1) + 2
    config = EngineConfig(page_size=ps, kv_cache_bytes=pages * page_bytes(ckpt.config, ps, np.float32),
                          kv_cache_dtype=kv_cache_dtype, max_seq_len=PROMPT + NEW + 8, max_num_seqs=POOL_REQUESTS,
                          max_prefill_chunk=256, max_num_batched_tokens=512, decode_buckets=(8, 16, POOL_REQUESTS),
                          prefill_buckets=(64, 256), enable_prefix_caching=False,
                          compilation_cache_dir=str(cache_dir() / "xla"))
    engine = Engine(ckpt, config)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(100, ckpt.config.vocab_size - 100, PROMPT).tolist() for _ in range(POOL_REQUESTS)]
    most = 0
    real_step = engine.step

    def step():  # counts the requests holding pages at once
        nonlocal most
        out = real_step()
        most = max(most, len(engine.scheduler.running))
        return out

    engine.step = step
    engine.generate(prompts[:2], SamplingParams(max_tokens=2, ignore_eos=True))
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = engine.generate(prompts, SamplingParams(max_tokens=NEW, ignore_eos=True))
        rates.append(sum(len(c.token_ids) for c in out) / (time.perf_counter() - t))
    return statistics.median(rates), most


def speed(ckpt, repeats: int) -> tuple[float, float, float]:
    from meshserve.models.default import cache_dir
    from meshserve.runtime.engine import Engine, EngineConfig
    from meshserve.runtime.sampling import SamplingParams

    config = EngineConfig(max_seq_len=PROMPT + NEW + 8, max_num_seqs=CONCURRENT, max_prefill_chunk=256,
                          max_num_batched_tokens=512, decode_buckets=(1, CONCURRENT), prefill_buckets=(64, 256),
                          compilation_cache_dir=str(cache_dir() / "xla"))
    engine = Engine(ckpt, config)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(100, ckpt.config.vocab_size - 100, PROMPT).tolist() for _ in range(CONCURRENT)]

    def run(batch, new):
        t = time.perf_counter()
        out = engine.generate(batch, SamplingParams(max_tokens=new, ignore_eos=True))
        assert all(len(c.token_ids) == new for c in out)
        return time.perf_counter() - t

    run(prompts[:1], 2)
    decode = [(NEW - 1) / (run(prompts[:1], NEW) - run(prompts[:1], 1)) for _ in range(repeats)]
    agg = [CONCURRENT * NEW / run(prompts, NEW) for _ in range(repeats)]
    compile_s = engine.compile_seconds
    return statistics.median(decode), statistics.median(agg), compile_s


def linears(params, config, formats: list[str], repeats: int) -> list[tuple[str, float, int]]:
    """(path, median ms, weight bytes) of one decode row through every linear layer and the head."""
    import jax
    import jax.numpy as jnp

    from meshserve.models import decoder

    def run(params, config):
        x = jnp.ones((1, 1, config.hidden_size), jnp.float32)

        def step(params, x):  # the weights an argument, as in the engine's programs (never constants)
            model = decoder.model(config, params)
            total = 0.0
            for layer in model.layers:
                attn, mlp = layer.attn, layer.mlp
                for w in (attn.q_proj, attn.k_proj, attn.v_proj):
                    total += jnp.sum(decoder._matmul(x, w))
                total += jnp.sum(decoder._matmul(jnp.ones((1, 1, config.num_heads * config.head_dim)), attn.o_proj))
                total += jnp.sum(decoder._matmul(x, mlp.gate_proj)) + jnp.sum(decoder._matmul(x, mlp.up_proj))
                total += jnp.sum(decoder._matmul(jnp.ones((1, 1, config.intermediate_size)), mlp.down_proj))
            return total + jnp.sum(model.head(x))

        fn = jax.jit(step)
        fn(params, x).block_until_ready()
        times = []
        for _ in range(repeats * 5):
            t = time.perf_counter()
            fn(params, x).block_until_ready()
            times.append(time.perf_counter() - t)
        return statistics.median(times) * 1e3

    host = jax.tree.map(np.asarray, params)
    nbytes = lambda p: sum(a.nbytes for a in jax.tree.leaves(p)) - p_embed_extra(p, config)
    rows = [("float32", run(params, config), nbytes(params))]
    for fmt in formats:
        qconfig = dataclasses.replace(config, quantization=fmt)
        qparams = jax.tree.map(jnp.asarray, decoder.quantize_params(host, qconfig))
        rows.append((fmt, run(qparams, qconfig), nbytes(qparams)))
    return rows


def p_embed_extra(params, config) -> int:
    """Bytes of the params a step does not read: the norms (small) and, untied, the embedding table."""
    import jax

    return 0 if config.tie_word_embeddings else sum(a.nbytes for a in jax.tree.leaves(params["embed"]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--formats", default=DEFAULT_FORMATS, help="comma-separated, of models/quant.py's")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--kv-dtypes", default="int8,fp8", help="comma-separated KV cache dtypes (engine.kv_cache_dtype)")
    ap.add_argument("--linears-only", action="store_true", help="only the linear layers' table")
    ap.add_argument("--kv-only", action="store_true", help="only the KV cache dtypes' table")
    args = ap.parse_args()

    import jax

    from meshserve.models.checkpoint import load_checkpoint
    from meshserve.models.decoder import quantize_params
    from meshserve.models.default import default_checkpoint

    base = load_checkpoint(default_checkpoint(), progress=False)
    tokens = corpus_tokens(base.tokenizer, SCORED)
    reference = jax.nn.log_softmax(_scores(base.params, base.config, tokens), axis=-1)
    host = jax.tree.map(np.asarray, base.params)
    if args.kv_only:
        return _print_kv(kv_rows(base, reference, tokens, args.kv_dtypes.split(","), args.repeats))
    formats = args.formats.split(",")
    timed = linears(base.params, base.config, formats, args.repeats)
    if args.linears_only:
        return _print_linears(timed)
    rows = {"float32": (1.0, 0.0, *speed(base, args.repeats), _weight_bytes(base.params))}
    for fmt in formats:
        config = dataclasses.replace(base.config, quantization=fmt)
        params = jax.tree.map(jax.numpy.asarray, quantize_params(host, config))
        ckpt = dataclasses.replace(base, config=config, params=params)
        rows[fmt] = (*accuracy(params, config, reference, tokens), *speed(ckpt, args.repeats), _weight_bytes(params))
        print(f"{fmt}: done", flush=True)

    print(f"machine: {os.cpu_count()} CPU cores; jax {jax.__version__}; default model; {SCORED} tokens scored")
    print(f"{'format':12}{'weights MB':>11}{'top-1':>8}{'mean KL':>9}{'batch 1 tok/s':>15}{'ratio':>7}"
          f"{'16 conc. tok/s':>16}{'ratio':>7}")
    f32 = rows["float32"]
    for name, (agree, kl, d, a, _, nbytes) in rows.items():
        print(f"{name:12}{nbytes / 1e6:11.0f}{agree:8.3f}{kl:9.4f}{d:15.1f}{d / f32[2]:7.2f}{a:16.1f}{a / f32[3]:7.2f}")
    _print_linears(timed)
    _print_kv(kv_rows(base, reference, tokens, args.kv_dtypes.split(","), args.repeats))


def kv_rows(base, reference, tokens, kv_dtypes: list[str], repeats: int) -> dict:
    from meshserve.runtime.kv_quant import cache_dtype

    rows = {"float32": (1.0, 0.0, *pool_bound(base, "float32", repeats))}
    for name in kv_dtypes:
        logits = _scores(base.params, base.config, tokens, cache_dtype(name, np.float32))
        rows[name] = (*_agreement(logits, reference), *pool_bound(base, name, repeats))
        print(f"KV {name}: done", flush=True)
    return rows


def _agreement(logits, reference_logp) -> tuple[float, float]:
    import jax
    import jax.numpy as jnp

    logp = jax.nn.log_softmax(logits, axis=-1)
    agree = float(jnp.mean(jnp.argmax(logp, -1) == jnp.argmax(reference_logp, -1)))
    kl = float(jnp.mean(jnp.sum(jnp.exp(reference_logp) * (reference_logp - logp), axis=-1)))
    return agree, kl


def _print_kv(rows) -> None:
    import jax

    print(f"\nKV cache dtypes (float32 weights; jax {jax.__version__}, {os.cpu_count()} CPU cores); pool-bound: "
          f"{POOL_REQUESTS} requests, a pool of {POOL_HOLDS} float32 requests' bytes:")
    print(f"{'KV dtype':10}{'top-1':>8}{'mean KL':>9}{'output tok/s':>14}{'ratio':>7}{'most at once':>14}")
    f32 = rows["float32"]
    for name, (agree, kl, rate, most) in rows.items():
        print(f"{name:10}{agree:8.3f}{kl:9.4f}{rate:14.1f}{rate / f32[2]:7.2f}{most:14d}")


def _print_linears(timed) -> None:
    print("\nthe linear layers and the head alone, one decode row:")
    print(f"{'path':12}{'MB read':>9}{'ms':>8}{'GB/s':>7}{'vs float32':>12}")
    for name, ms, nbytes in timed:
        print(f"{name:12}{nbytes / 1e6:9.0f}{ms:8.2f}{nbytes / ms / 1e6:7.1f}{timed[0][1] / ms:11.2f}x")


def _weight_bytes(params) -> int:
    import jax

    return sum(a.nbytes for a in jax.tree.leaves(params))


if __name__ == "__main__":
    main()
