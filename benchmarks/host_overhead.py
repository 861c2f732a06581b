"""The host's cost per engine step: decode steps per second at batch 1, 16 and 64 on a tiny random
model (2 layers, d=64, vocabulary 512), whose device time is near zero, so what is measured is the
engine around the programs (scheduling, building the call, dispatch, reading the results back,
detokenizing, stop checks). The default model's tokenizer detokenizes.

Each figure is the median of --repeats timings of --steps steady decode steps (every request
decoding, none finishing). Printed last: steps/s per batch and the time split of one step.

    .venv/bin/python benchmarks/host_overhead.py [--steps 200] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

import source_tree  # noqa: F401  (meshserve from this checkout when not installed)

BATCHES = (1, 16, 64)
PROMPT = 16


def tiny_checkpoint():
    import jax.numpy as jnp

    from meshserve.models.checkpoint import Checkpoint
    from meshserve.models.config import ModelConfig
    from meshserve.models.default import default_checkpoint
    from meshserve.models.llama import init_params
    from meshserve.models.tokenizer import Tokenizer

    config = ModelConfig(name="tiny", architecture="llama", vocab_size=512, hidden_size=64, intermediate_size=128,
                         num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=4096)
    tokenizer = Tokenizer.load(default_checkpoint(progress=False))
    return Checkpoint(path=None, config=config, tokenizer=tokenizer, dtype=np.dtype("float32"),
                      params=init_params(config, seed=0, dtype=jnp.float32))


def steps_per_second(ckpt, batch: int, steps: int, repeats: int) -> tuple[float, dict[str, float]]:
    from meshserve.runtime.engine import Engine, EngineConfig
    from meshserve.runtime.sampling import SamplingParams

    total = PROMPT + (repeats + 1) * steps + 8
    config = EngineConfig(max_seq_len=1024, max_num_seqs=batch, max_num_batched_tokens=max(256, batch),
                          max_prefill_chunk=256, prefill_buckets=(256,), decode_buckets=(batch,),
                          context_buckets=(64,), kv_cache_bytes=32 * 2**20,
                          enable_prefix_caching=False)
    engine = Engine(ckpt, config)
    rng = np.random.default_rng(0)
    params = SamplingParams(max_tokens=total, ignore_eos=True)
    for _ in range(batch):
        engine.add_request(rng.integers(1, 500, PROMPT).tolist(), params)
    while any(s.num_computed < s.prompt_len for s in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()  # prompts in: from here on every step is a decode of the whole batch
    for _ in range(5):
        engine.step()
    rates = []
    split = {"build": 0.0, "run": 0.0, "results": 0.0}
    runner, run_on_device = engine.runner, engine._run_on_device
    build = runner.build

    def timed(name, fn):
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                split[name] += time.perf_counter() - t
        return wrapper

    runner.build = timed("build", build)
    engine._run_on_device = timed("run", run_on_device)
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(steps):
            outs = engine.step()
            assert len(outs) == batch and not any(o.finished for o in outs)
        rates.append(steps / (time.perf_counter() - t))
    step_s = repeats * steps / sum(steps / r for r in rates)
    per_step = {k: v / (repeats * steps) * 1e6 for k, v in split.items()}
    per_step["rest"] = 1e6 / step_s - per_step["build"] - per_step["run"]
    del per_step["results"]
    return statistics.median(rates), per_step


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    import jax

    ckpt = tiny_checkpoint()
    rows = [(b, *steps_per_second(ckpt, b, args.steps, args.repeats)) for b in BATCHES]
    print(f"machine: {os.cpu_count()} CPU cores; jax {jax.__version__} ({jax.default_backend()}); "
          f"tiny model: 2 layers, d=64, vocabulary 512")
    print(f"{'batch':>6}{'steps/s':>10}{'tokens/s':>11}   µs per step: build / device call and read-back / rest")
    for b, rate, split in rows:
        print(f"{b:6d}{rate:10.0f}{rate * b:11.0f}   {split['build']:.0f} / {split['run']:.0f} / {split['rest']:.0f}")
    print("decode steps/s: " + ", ".join(f"batch {b} {rate:.0f}" for b, rate, _ in rows))


if __name__ == "__main__":
    main()
