"""The engine on a GPU at Llama-3-8B shapes (random bf16 weights), parts c–e of benchmarks/gpu_suite.sh.

    engine   c. the decode step through the engine's compiled programs at batch 1, 16 and 64 with
                2,048 tokens of context per row: ms per step for the program alone and for a whole
                engine step (host included), against the memory roofline (weights + KV read over the
                card's bandwidth) and against a plain-XLA stream of the same weights (every matmul
                of the model, no attention) measured in the same process;
             d. engine throughput: a synthetic chat-like mix (input 100–1,000 tokens, output
                50–500, EOS ignored) kept at --concurrency requests in flight for --seconds: output
                tok/s, TTFT and ITL p50/p99.
    peer     transformers `generate` on the same shape (random bf16 weights, eager), the same batch,
             prompts of the mix's mean length: output tok/s (a process of its own: torch and JAX
             would share the card's memory).
    parity   e. the default model's shape (SmolLM2-135M: a GPU machine without network has no copy of
             its GGUF, too large to travel with the checkout, so random float32 weights from a fixed
             seed) end to end on the GPU: greedy tokens against the dense no-cache forward on the CPU.

Each prints `FIGURES {json}` lines (benchmarks/gpu_suite.sh collects them) and a short table.
`--smoke` runs every part on a tiny model, on whatever backend there is (CPU here), to check the
script itself.

    python benchmarks/engine_gpu.py engine [--seconds 90] [--smoke]
    python benchmarks/engine_gpu.py peer | parity
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

import source_tree  # noqa: F401  (meshserve from this checkout when not installed)

ROOT = Path(__file__).resolve().parents[1]
BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12}  # datasheet HBM bytes/s, for the roofline
SMOKE = dict(name="smoke", architecture="llama", vocab_size=512, hidden_size=64, intermediate_size=128,
             num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=4096)


def figures(part: str, **values) -> None:
    print("FIGURES " + json.dumps({"part": part, **values}), flush=True)


def model_config(args):
    from meshserve.models.config import ModelConfig

    if args.smoke:
        return ModelConfig(**SMOKE)
    return ModelConfig.from_yaml(ROOT / "configs" / "models" / args.model)


def synthetic_tokenizer(vocab_size: int, bos: int | None, eos: tuple[int, ...]):
    """A word-level tokenizer with one token per id (random weights need no real vocabulary; the
    engine still detokenizes every token it makes)."""
    from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers

    from meshserve.models.tokenizer import Tokenizer, TokenizerConfig

    backend = HFTokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return Tokenizer(backend, TokenizerConfig(bos_token=None if bos is None else f"t{bos}",
                                              eos_tokens=tuple(f"t{i}" for i in eos), add_bos_token=False,
                                              chat_template=None))


def random_checkpoint(config, dtype, seed: int = 0):
    import jax.numpy as jnp

    from meshserve.models.checkpoint import Checkpoint
    from meshserve.models.decoder import init_params

    eos = tuple(i for i in config.eos_token_ids if i < config.vocab_size)
    return Checkpoint(path=None, config=config, dtype=np.dtype(dtype),
                      tokenizer=synthetic_tokenizer(config.vocab_size, config.bos_token_id, eos),
                      params=init_params(config, seed=seed, dtype=jnp.dtype(dtype)))


def card() -> tuple[str, float]:
    import jax

    kind = jax.devices()[0].device_kind
    bandwidth = next((b for name, b in BANDWIDTH.items() if name in kind), float("nan"))
    return kind, bandwidth


def percentile(values, q):
    return float(np.percentile(values, q)) if values else float("nan")


# ---- c. decode step ------------------------------------------------------------------------------

def decode_steps(engine, ckpt, batch: int, context: int, iters: int) -> dict:
    """`batch` requests with `context`-token prompts are prefilled, then decode steps are timed: the
    engine's whole step (host included) and its compiled decode program alone on the same call."""
    import jax

    from meshserve.runtime.sampling import SamplingParams

    rng = np.random.default_rng(batch)
    vocab = ckpt.config.vocab_size
    ids = [engine.add_request(rng.integers(10, vocab - 10, context).tolist(),
                              SamplingParams(max_tokens=4 * iters + 16, ignore_eos=True)) for _ in range(batch)]
    while engine.scheduler.waiting or any(s.num_computed < s.prompt_len for s in engine.scheduler.running):
        engine.step()
    for _ in range(3):
        engine.step()
    calls, run = [], engine.runner.run

    def capture(params, pool, launched):
        calls[:] = launched
        return run(params, pool, launched)

    engine.runner.run = capture
    try:
        steps = []
        for _ in range(iters):
            t = time.perf_counter()
            engine.step()
            steps.append(time.perf_counter() - t)
    finally:
        engine.runner.run = run
    call = next(c for c in calls if c.shape[0] == "decode")
    program = engine.programs.compiled[call.shape]
    batch_arrays = jax.device_put(call.batch)
    jax.block_until_ready(engine.pool)
    alone = []
    for _ in range(iters):
        t = time.perf_counter()
        engine.pool, engine.runner.last, sampled, *_ = program(ckpt.params, engine.pool, engine.runner.last,
                                                               batch_arrays)
        jax.block_until_ready(sampled.tokens)
        alone.append(time.perf_counter() - t)
    for rid in ids:
        engine.abort(rid)
    engine.step()
    return {"step_ms": statistics.median(steps) * 1e3, "program_ms": statistics.median(alone) * 1e3,
            "bucket": call.shape[1]}


def weight_stream(ckpt, batch: int, iters: int) -> float:
    """ms per pass of `batch` rows through every weight matrix of the model as plain XLA matmuls (the
    attention left out): what streaming these weights costs on this card, in the same run."""
    import jax
    import jax.numpy as jnp

    p = ckpt.params

    @jax.jit
    def stream(x, params):
        for i in range(len(params["layers"])):
            a, m = params["layers"][i]["attn"], params["layers"][i]["mlp"]
            q = x @ a["q_proj"].reshape(x.shape[1], -1)
            k = x @ a["k_proj"].reshape(x.shape[1], -1)
            v = x @ a["v_proj"].reshape(x.shape[1], -1)
            h = (q + jnp.tile(k + v, q.shape[1] // k.shape[1])) @ a["o_proj"].reshape(-1, x.shape[1])
            x = x + h
            x = x + (jax.nn.silu(x @ m["gate_proj"]) * (x @ m["up_proj"])) @ m["down_proj"]
        head = params["lm_head"] if "lm_head" in params else params["embed"].T
        return x @ head

    x = jnp.asarray(np.random.default_rng(0).standard_normal((batch, ckpt.config.hidden_size)) * 0.1,
                    ckpt.params["embed"].dtype)
    jax.block_until_ready(stream(x, p))
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        jax.block_until_ready(stream(x, p))
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def bytes_per_step(ckpt, batch: int, context: int) -> float:
    """The fewest bytes a decode step moves: every weight once (not the embedding table, of which
    it gathers `batch` rows; a tied head reads it whole) and every row's KV once."""
    import jax

    c = ckpt.config
    weights = sum(a.nbytes for path, a in jax.tree_util.tree_leaves_with_path(ckpt.params)
                  if jax.tree_util.keystr(path) != "['embed']" or c.tie_word_embeddings)
    kv = batch * context * 2 * c.num_layers * c.num_kv_heads * c.head_dim * ckpt.dtype.itemsize
    return weights + kv


# ---- d. throughput -------------------------------------------------------------------------------

def chat_mix(engine, ckpt, seconds: float, concurrency: int, smoke: bool) -> dict:
    """Requests of U[100, 1000] input and U[50, 500] output tokens kept `concurrency` in flight for
    `seconds`; tokens counted as they arrive within the window."""
    from meshserve.runtime.sampling import SamplingParams

    rng = np.random.default_rng(7)
    vocab = ckpt.config.vocab_size
    lo_in, hi_in, lo_out, hi_out = (10, 60, 5, 40) if smoke else (100, 1000, 50, 500)
    started, last, ttft, itl, live = {}, {}, [], [], set()
    tokens = done = 0
    t0 = time.perf_counter()
    end = t0 + seconds
    while time.perf_counter() < end:
        while len(live) < concurrency:
            rid = engine.add_request(rng.integers(10, vocab - 10, int(rng.integers(lo_in, hi_in + 1))).tolist(),
                                     SamplingParams(max_tokens=int(rng.integers(lo_out, hi_out + 1)), ignore_eos=True))
            started[rid] = time.perf_counter()
            live.add(rid)
        outs = engine.step()
        now = time.perf_counter()
        for out in outs:
            if out.token_ids:
                tokens += len(out.token_ids)
                if out.request_id in last:
                    itl.append(now - last[out.request_id])
                else:
                    ttft.append(now - started[out.request_id])
                last[out.request_id] = now
            if out.finished:
                live.discard(out.request_id)
                done += 1
    elapsed = time.perf_counter() - t0
    for rid in list(live):
        engine.abort(rid)
    engine.step()
    return {"seconds": elapsed, "requests_done": done, "output_tok_s": tokens / elapsed,
            "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
            "itl_p50_ms": percentile(itl, 50) * 1e3, "itl_p99_ms": percentile(itl, 99) * 1e3}


def engine_config(args):
    """The engine the suite times (benchmarks/gpu_build.py builds its programs for H100 and H200)."""
    from meshserve.runtime.engine import EngineConfig

    context = 200 if args.smoke else args.context
    batches = tuple(int(b) for b in args.batches.split(","))
    return EngineConfig(
        page_size=16, max_seq_len=context + 256, max_num_seqs=max(max(batches), args.concurrency),
        max_num_batched_tokens=args.prefill_tokens, max_prefill_chunk=args.prefill_tokens,
        prefill_buckets=(args.prefill_tokens // 4, args.prefill_tokens), decode_buckets=batches,
        kv_cache_bytes=int(args.kv_gib * 2**30), compile_threads=8, enable_prefix_caching=False)


def run_engine(args) -> None:
    import jax

    from meshserve.runtime.engine import Engine

    config = model_config(args)
    dtype = "float32" if args.smoke else "bfloat16"
    t = time.perf_counter()
    ckpt = random_checkpoint(config, dtype)
    jax.block_until_ready(ckpt.params)
    init_s = time.perf_counter() - t
    context = 200 if args.smoke else args.context
    batches = tuple(int(b) for b in args.batches.split(","))
    t = time.perf_counter()
    engine = Engine(ckpt, engine_config(args))
    kind, bandwidth = card()
    print(f"{kind}; jax {jax.__version__}; {config.name} {dtype}: weights made in {init_s:.1f} s, "
          f"{len(engine.programs)} programs compiled in {time.perf_counter() - t:.1f} s "
          f"(attention: {engine.attention})", flush=True)
    rows = []
    for b in batches:
        step = decode_steps(engine, ckpt, b, context, args.iters)
        xla = weight_stream(ckpt, b, args.iters)
        roofline = bytes_per_step(ckpt, b, context) / bandwidth * 1e3
        figures("decode", batch=b, context=context, **step, xla_weight_stream_ms=xla, roofline_ms=roofline,
                card=kind, jax=jax.__version__)
        rows.append((b, step["program_ms"], step["step_ms"], xla, roofline))
    mix = chat_mix(engine, ckpt, args.seconds, args.concurrency, args.smoke)
    figures("throughput", concurrency=args.concurrency, **mix, card=kind, jax=jax.__version__)
    print(f"{'batch':>6}{'program ms':>12}{'engine step ms':>16}{'XLA weights ms':>16}{'roofline ms':>13}"
          f"{'% of roofline':>15}")
    for b, program, step, xla, roofline in rows:
        print(f"{b:6d}{program:12.2f}{step:16.2f}{xla:16.2f}{roofline:13.2f}{100 * roofline / program:15.0f}")
    print(f"chat mix, {args.concurrency} in flight for {mix['seconds']:.0f} s: {mix['output_tok_s']:.0f} output tok/s, "
          f"TTFT p50/p99 {mix['ttft_p50_s']:.2f}/{mix['ttft_p99_s']:.2f} s, "
          f"ITL p50/p99 {mix['itl_p50_ms']:.1f}/{mix['itl_p99_ms']:.1f} ms, {mix['requests_done']} requests done")


# ---- the peer: transformers generate -------------------------------------------------------------

def run_peer(args) -> None:
    import torch
    import transformers

    config = model_config(args)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    hf_config = transformers.LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads, head_dim=config.head_dim,
        max_position_embeddings=config.max_position_embeddings, rms_norm_eps=config.rms_norm_eps,
        rope_theta=config.rope_theta, tie_word_embeddings=config.tie_word_embeddings)
    torch.set_default_dtype(dtype)  # made in place on the card, in its dtype
    with torch.device(device):
        model = transformers.LlamaForCausalLM(hf_config).eval()
    prompt, new = (30, 16) if args.smoke else (550, args.peer_new)
    ids = torch.randint(10, config.vocab_size - 10, (args.concurrency, prompt), device=device)

    def generate(n):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, pad_token_id=0)
        if device == "cuda":
            torch.cuda.synchronize()
        assert out.shape[1] == prompt + n
        return time.perf_counter() - t

    generate(2)  # warm-up
    seconds = generate(new)
    rate = args.concurrency * new / seconds
    kind = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    figures("peer", batch=args.concurrency, prompt=prompt, new=new, output_tok_s=rate,
            ms_per_step=seconds / new * 1e3, card=kind, torch=torch.__version__,
            transformers=transformers.__version__)
    print(f"transformers {transformers.__version__} generate, {config.name} {dtype}, batch {args.concurrency}, "
          f"{prompt} + {new} tokens: {rate:.0f} output tok/s ({seconds / new * 1e3:.1f} ms/step, prefill included)")


# ---- e. parity -----------------------------------------------------------------------------------

def parity_engine_config():
    from meshserve.runtime.engine import EngineConfig

    return EngineConfig(max_seq_len=512, max_num_seqs=4, max_num_batched_tokens=256, max_prefill_chunk=256,
                        kv_cache_bytes=64 * 2**20)


def run_parity(args) -> None:
    """Greedy tokens of the default model's shape on the accelerator (the engine, its default
    attention there) against the dense no-cache forward pass on the CPU."""
    import jax
    import jax.numpy as jnp

    from meshserve.models.config import ModelConfig
    from meshserve.models.decoder import forward
    from meshserve.runtime.engine import Engine
    from meshserve.runtime.sampling import SamplingParams

    jax.config.update("jax_default_matmul_precision", "highest")  # float32 products, not TF32
    config = ModelConfig(**SMOKE) if args.smoke else ModelConfig.from_yaml(ROOT / "configs/models/smollm2-135m.yaml")
    ckpt = random_checkpoint(config, "float32", seed=3)
    engine = Engine(ckpt, parity_engine_config())
    rng = np.random.default_rng(5)
    prompts = [rng.integers(10, config.vocab_size - 10, n).tolist() for n in (5, 40, 200)]
    new = 12
    got = [list(c.token_ids) for c in engine.generate(prompts, SamplingParams(max_tokens=new, ignore_eos=True))]
    cpu = jax.devices("cpu")[0]
    params = jax.device_put(ckpt.params, cpu)  # committed there: the reference runs on the CPU
    # one program for every length: the tokens padded to the longest sequence (causal: the padding
    # after position i leaves its logits alone)
    width = max(len(p) for p in prompts) + new
    step = jax.jit(lambda p, t, i: forward(p, t, jnp.arange(width)[None], config=config)[0][0, i])
    want = []
    for ids in prompts:
        ids = list(ids)
        for _ in range(new):
            padded = jax.device_put(np.asarray([ids + [0] * (width - len(ids))], np.int32), cpu)
            ids.append(int(np.argmax(step(params, padded, len(ids) - 1))))
        want.append(ids[-new:])
    same = [sum(a == b for a, b in zip(g, w)) for g, w in zip(got, want)]
    figures("parity", backend=jax.default_backend(), attention=engine.attention, prompts=[len(p) for p in prompts],
            tokens_equal=same, of=new, equal=got == want)
    print(f"default model shape on {jax.default_backend()} (attention {engine.attention}) against the CPU's dense "
          f"forward: {'equal' if got == want else 'DIFFERENT'} ({same} of {new} greedy tokens per prompt)")


def parse_args(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("part", choices=("engine", "peer", "parity"))
    ap.add_argument("--model", default="llama3-8b.yaml", help="a file of configs/models/")
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--iters", type=int, default=12)
    ap.add_argument("--seconds", type=float, default=120.0, help="length of the chat-mix run")
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--prefill-tokens", type=int, default=2048, help="largest prefill call")
    ap.add_argument("--kv-gib", type=float, default=24.0, help="KV cache size")
    ap.add_argument("--peer-new", type=int, default=128, help="tokens transformers generates")
    ap.add_argument("--smoke", action="store_true", help="a tiny model, to check the script anywhere")
    args = ap.parse_args(argv)
    if args.smoke:
        args.batches, args.concurrency, args.iters, args.kv_gib = "1,4", 4, 5, 0.05
        args.seconds, args.prefill_tokens = min(args.seconds, 5.0), 256
    return args


def main() -> None:
    args = parse_args()
    {"engine": run_engine, "peer": run_peer, "parity": run_parity}[args.part](args)


if __name__ == "__main__":
    main()
