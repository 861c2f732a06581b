"""Time to first token with and without a cached prefix, on the default model (or --model).

A long shared prefix (default 2,000 tokens) plus a short new suffix (default 50): TTFT cold (nothing
cached), on a device hit (the prefix's pages still in the KV pool) and on a host hit (the pages
evicted to host memory, copied back in), each the median of --runs requests with fresh suffixes.
Prints the ratios to cold. Then, on an engine with no host memory and a tensorstore folder, TTFT
cold vs a store hit (the pages read back from disk) for a sweep of prefix lengths: where the store
starts to beat recomputing.

    python benchmarks/prefix.py [--prefix 2000] [--suffix 50] [--runs 5] [--sweep 16,64,256,1024,2000]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import source_tree  # noqa: E402,F401  (meshserve from this checkout when not installed)

import numpy as np  # noqa: E402

from meshserve.models.checkpoint import load_checkpoint  # noqa: E402
from meshserve.models.default import default_checkpoint  # noqa: E402
from meshserve.runtime.engine import Engine, EngineConfig  # noqa: E402
from meshserve.runtime.sampling import SamplingParams  # noqa: E402


def ttft(engine: Engine, prompt: list[int]) -> tuple[float, int]:
    """Seconds from add_request to the first token, and the prompt tokens found cached."""
    t0 = time.perf_counter()
    engine.add_request(prompt, SamplingParams(max_tokens=1, ignore_eos=True))
    while True:
        for out in engine.step():
            if out.token_ids:
                elapsed = time.perf_counter() - t0
                while engine.has_unfinished:
                    engine.step()
                return elapsed, out.cached_tokens


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--prefix", type=int, default=2000)
    p.add_argument("--suffix", type=int, default=50)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--sweep", default="16,64,256,1024,2000", help="prefix lengths for the store rows")
    args = p.parse_args(argv)
    ckpt = load_checkpoint(args.model or default_checkpoint(), progress=False)
    ps, chunk = 16, 256
    pages = -(-(args.prefix + args.suffix + 1) // ps)
    config = EngineConfig(page_size=ps, kv_cache_bytes=512 * 2**20, max_seq_len=pages * ps,
                          max_num_seqs=1, max_num_batched_tokens=chunk, max_prefill_chunk=chunk,
                          prefill_buckets=(64, chunk), decode_buckets=(1,), context_buckets=(pages,),
                          host_kv_bytes=512 * 2**20)
    engine = Engine(ckpt, config)
    rng = np.random.default_rng(0)
    vocab = ckpt.config.vocab_size

    def prompt(prefix):
        return prefix + rng.integers(100, vocab, args.suffix).tolist()

    ttft(engine, rng.integers(100, vocab, 300).tolist())  # warm up the programs
    cold, hit, host = [], [], []
    for _ in range(args.runs):
        prefix = rng.integers(100, vocab, args.prefix).tolist()  # a new prefix: nothing cached
        t, cached = ttft(engine, prompt(prefix))
        assert cached == 0
        cold.append(t)
        t, cached = ttft(engine, prompt(prefix))  # the same prefix, a new suffix: a device hit
        assert cached >= args.prefix - ps, cached
        hit.append(t)
        engine.evict_prefix_cache()  # to host memory
        t, cached = ttft(engine, prompt(prefix))  # found on the host, copied back in
        assert cached >= args.prefix - ps, cached
        host.append(t)
        engine.evict_prefix_cache()
    c, h, o = statistics.median(cold), statistics.median(hit), statistics.median(host)
    print(f"{ckpt.config.name}, prefix {args.prefix} + suffix {args.suffix} tokens, median of {args.runs}")
    print(f"{'':>12} {'TTFT ms':>10}")
    print(f"{'cold':>12} {c * 1e3:>10.1f}")
    print(f"{'device hit':>12} {h * 1e3:>10.1f}")
    print(f"{'host hit':>12} {o * 1e3:>10.1f}")
    print(f"device hit / cold = {h / c:.3f}, host hit / cold = {o / c:.3f}")

    import dataclasses
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        store = Engine(ckpt, dataclasses.replace(config, host_kv_bytes=0, kv_store=folder))
        ttft(store, rng.integers(100, vocab, 300).tolist())
        print(f"\n{'prefix':>8} {'cold ms':>10} {'store hit ms':>13} {'ratio':>7}")
        for n in [int(x) for x in args.sweep.split(",")]:
            cold, hit = [], []
            for _ in range(args.runs):
                prefix = rng.integers(100, vocab, n).tolist()
                cold.append(ttft(store, prompt(prefix))[0])
                store.evict_prefix_cache()  # no host memory: the pages go to the store
                t, cached = ttft(store, prompt(prefix))
                assert cached >= n - ps, (n, cached)
                hit.append(t)
                store.evict_prefix_cache()
            c, h = statistics.median(cold), statistics.median(hit)
            print(f"{n:>8} {c * 1e3:>10.1f} {h * 1e3:>13.1f} {h / c:>7.3f}")
        # a restart: a new engine on the same store finds the last prefix there
        last = prefix
        del store
        restarted = Engine(ckpt, dataclasses.replace(config, host_kv_bytes=0, kv_store=folder))
        ttft(restarted, rng.integers(100, vocab, 300).tolist())
        t, cached = ttft(restarted, prompt(last))
        assert cached >= len(last) - ps, cached
        print(f"after a restart, prefix {len(last)}: store hit {t * 1e3:.1f} ms ({t / c:.3f} of cold)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
