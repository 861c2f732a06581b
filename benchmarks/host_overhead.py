"""The host's cost per engine step: decode steps per second at batch 1, 16 and 64 on a tiny random
model (2 layers, d=64, vocabulary 512), whose device time is near zero, so what is measured is the
engine around the programs (scheduling, building the call, dispatch, reading the results back,
detokenizing, stop checks). The default model's tokenizer detokenizes.

Each figure is the median of --repeats timings of --steps steady decode steps (every request
decoding, none finishing). Printed last: steps/s per batch; the host's own time per step (all
but the time spent waiting for the device's results) and the pace the host alone would allow. With
async scheduling the host builds step N+1 while the device runs step N, so steps/s is set by the
slower of the two; on a 2-core CPU the device's programs are not free, and grow with the context
(the jnp attention of 64 rows over a few hundred tokens).

    .venv/bin/python benchmarks/host_overhead.py [--steps 200] [--repeats 3] [--compare]
    .venv/bin/python benchmarks/host_overhead.py --against REV [--batches 64] [--rounds 3]

--against REV times this checkout and commit REV side by side on the same machine in one run: each
round runs the benchmark once per tree, each in a fresh process (the other tree's `meshserve` from a
`git archive` of REV, MESHSERVE_TREE), alternating which goes first; printed last are the medians
over rounds and the ratio (this tree / REV).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import source_tree  # noqa: F401  (meshserve from this checkout when not installed)

BATCHES = (1, 16, 64)
PROMPT = 16


def tiny_checkpoint():
    import jax.numpy as jnp

    from meshserve.models.checkpoint import Checkpoint
    from meshserve.models.config import ModelConfig
    from meshserve.models.default import default_checkpoint
    from meshserve.models.decoder import init_params
    from meshserve.models.tokenizer import Tokenizer

    config = ModelConfig(name="tiny", architecture="llama", vocab_size=512, hidden_size=64, intermediate_size=128,
                         num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=4096)
    tokenizer = Tokenizer.load(default_checkpoint(progress=False))
    return Checkpoint(path=None, config=config, tokenizer=tokenizer, dtype=np.dtype("float32"),
                      params=init_params(config, seed=0, dtype=jnp.float32))


def steps_per_second(ckpt, batch: int, steps: int, repeats: int, overlap: bool) -> tuple[float, dict[str, float]]:
    import jax

    from meshserve.runtime.engine import Engine, EngineConfig
    from meshserve.runtime.sampling import SamplingParams

    total = PROMPT + (repeats + 1) * steps + 8
    config = EngineConfig(max_seq_len=1024, max_num_seqs=batch, max_num_batched_tokens=max(256, batch),
                          max_prefill_chunk=256, prefill_buckets=(256,), decode_buckets=(batch,),
                          context_buckets=(64,), kv_cache_bytes=32 * 2**20,
                          enable_prefix_caching=False, async_scheduling=overlap)
    engine = Engine(ckpt, config)
    rng = np.random.default_rng(0)
    params = SamplingParams(max_tokens=total, ignore_eos=True)
    for _ in range(batch):
        engine.add_request(rng.integers(1, 500, PROMPT).tolist(), params)
    while any(s.num_computed < s.prompt_len for s in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()  # prompts in: from here on every step is a decode of the whole batch
    for _ in range(5):
        engine.step()
    rates, waits = [], []
    device_get = jax.device_get  # the engine reads results back only through it: time spent there is
    waited = [0.0]               # waiting for the device; everything else is the host's own work

    def timed_get(tree):
        t = time.perf_counter()
        try:
            return device_get(tree)
        finally:
            waited[0] += time.perf_counter() - t

    jax.device_get = timed_get
    try:
        for _ in range(repeats):
            waited[0] = 0.0
            t = time.perf_counter()
            for _ in range(steps):
                outs = engine.step()
                assert len(outs) == batch and not any(o.finished for o in outs)
            rates.append(steps / (time.perf_counter() - t))
            waits.append(waited[0] / steps)
    finally:
        jax.device_get = device_get
    rate, wait = statistics.median(rates), statistics.median(waits)
    return rate, {"host": 1e6 / rate - wait * 1e6, "wait": wait * 1e6}


def side_by_side(rev: str, args) -> None:
    """This tree against commit `rev`, each timed in fresh processes, alternating."""
    root = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory(prefix="meshserve-") as tmp:
        archive = subprocess.run(["git", "-C", str(root), "archive", rev], capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        trees = {"this tree": None, rev: tmp}
        rates: dict[str, dict[int, list[float]]] = {name: {b: [] for b in args.batches} for name in trees}
        host = {name: {b: [] for b in args.batches} for name in trees}  # the host's own µs per step
        for r in range(args.rounds):
            for name in (list(trees) if r % 2 == 0 else list(trees)[::-1]):
                env = {**os.environ, **({"MESHSERVE_TREE": trees[name]} if trees[name] else {})}
                cmd = [sys.executable, __file__, "--json", "--steps", str(args.steps), "--repeats", str(args.repeats),
                       "--batches", *map(str, args.batches)]
                run = subprocess.run(cmd, env=env, capture_output=True, text=True)
                if run.returncode != 0:
                    raise SystemExit(f"the run of {name} failed:\n{run.stderr[-2000:]}")
                for row in json.loads(run.stdout.strip().splitlines()[-1]):
                    rates[name][row["batch"]].append(row["steps_per_s"])
                    host[name][row["batch"]].append(row["host"])
                print(f"round {r + 1} {name}: " + ", ".join(f"batch {b} {rates[name][b][-1]:.0f}" for b in args.batches),
                      flush=True)
    print(f"medians of {args.rounds} rounds; ratio: this tree / {rev}")
    print(f"{'batch':>6}{'steps/s: this tree':>20}{rev[:12]:>14}{'ratio':>8}{'host µs/step: this tree':>25}"
          f"{rev[:12]:>14}{'ratio':>8}")
    for b in args.batches:
        new, old = (statistics.median(rates[name][b]) for name in trees)
        new_host, old_host = (statistics.median(host[name][b]) for name in trees)
        print(f"{b:6d}{new:20.0f}{old:14.0f}{new / old:8.2f}{new_host:25.0f}{old_host:14.0f}{new_host / old_host:8.2f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    ap.add_argument("--compare", action="store_true", help="also step in lock-step (async scheduling off)")
    ap.add_argument("--against", metavar="REV", help="time commit REV side by side with this tree")
    ap.add_argument("--rounds", type=int, default=3, help="with --against: alternating runs of each tree")
    ap.add_argument("--json", action="store_true", help=argparse.SUPPRESS)  # one line of figures (--against)
    args = ap.parse_args()
    if args.against:
        return side_by_side(args.against, args)
    import jax

    ckpt = tiny_checkpoint()
    modes = (True, False) if args.compare else (True,)
    rows = [(b, overlap, *steps_per_second(ckpt, b, args.steps, args.repeats, overlap))
            for b in args.batches for overlap in modes]
    if args.json:
        print(json.dumps([{"batch": b, "async": overlap, "steps_per_s": rate, **split}
                          for b, overlap, rate, split in rows]))
        return
    print(f"machine: {os.cpu_count()} CPU cores; jax {jax.__version__} ({jax.default_backend()}); "
          f"tiny model: 2 layers, d=64, vocabulary 512")
    print(f"{'batch':>6}{'scheduling':>12}{'steps/s':>10}{'tokens/s':>11}{'host µs/step':>14}{'waiting µs/step':>17}"
          f"{'host pace, steps/s':>20}")
    for b, overlap, rate, split in rows:
        print(f"{b:6d}{'async' if overlap else 'lock-step':>12}{rate:10.0f}{rate * b:11.0f}{split['host']:14.0f}"
              f"{split['wait']:17.0f}{1e6 / split['host']:20.0f}")
    print("decode steps/s (async scheduling): " + ", ".join(
        f"batch {b} {rate:.0f} (host pace {1e6 / split['host']:.0f})" for b, overlap, rate, split in rows if overlap))


if __name__ == "__main__":
    main()
