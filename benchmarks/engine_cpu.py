"""Engine speed on CPU against Hugging Face transformers `generate`, side by side in one run.

Workloads, on the default model (SmolLM2-135M-Instruct, float32, both sides read the same GGUF):
  batch 1:  decode tokens/s of one request (64-token prompt; time of 64 new tokens minus time of 1)
  batch 16: aggregate output tokens/s of 16 concurrent requests (64-token prompts, 64 new tokens,
            greedy), prefill included
Each figure is the median of --repeats runs. The last line prints both ratios (ours / transformers).

    .venv/bin/python benchmarks/engine_cpu.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

import source_tree  # noqa: E402,F401  (meshserve from this checkout when not installed)

PROMPT, NEW, CONCURRENT = 64, 64, 16


def prompts(vocab: int, n: int) -> list[list[int]]:
    rng = np.random.default_rng(0)
    return [rng.integers(100, vocab - 100, PROMPT).tolist() for _ in range(n)]


def time_ours(engine, batch: list[list[int]], new: int) -> float:
    from meshserve.runtime.sampling import SamplingParams

    params = SamplingParams(max_tokens=new, ignore_eos=True)
    t = time.perf_counter()
    out = engine.generate(batch, params)
    elapsed = time.perf_counter() - t
    assert all(len(c.token_ids) == new for c in out)
    return elapsed


def time_theirs(model, batch: list[list[int]], new: int) -> float:
    import torch

    ids = torch.tensor(batch)
    with torch.inference_mode():
        t = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                             min_new_tokens=new, do_sample=False, pad_token_id=0)
        elapsed = time.perf_counter() - t
    assert out.shape[1] == PROMPT + new
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import jax
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    from meshserve.models.checkpoint import load_checkpoint
    from meshserve.models.default import cache_dir, default_checkpoint, default_gguf
    from meshserve.runtime.engine import Engine, EngineConfig

    ckpt = load_checkpoint(default_checkpoint(), progress=False)
    gguf = default_gguf()
    hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    config = EngineConfig(max_seq_len=PROMPT + NEW, max_num_seqs=CONCURRENT, max_prefill_chunk=PROMPT,
                          max_num_batched_tokens=CONCURRENT * PROMPT, decode_buckets=(1, CONCURRENT),
                          prefill_buckets=(PROMPT,), compilation_cache_dir=str(cache_dir() / "xla"))
    engine = Engine(ckpt, config)
    single = prompts(ckpt.config.vocab_size, 1)
    many = prompts(ckpt.config.vocab_size, CONCURRENT)

    # warm-up both sides once
    time_ours(engine, single, 2), time_theirs(hf, single, 2)
    rows = {}
    for name, fn, model in (("meshserve", time_ours, engine), ("transformers", time_theirs, hf)):
        decode = [(NEW - 1) / (fn(model, single, NEW) - fn(model, single, 1)) for _ in range(args.repeats)]
        agg = [CONCURRENT * NEW / fn(model, many, NEW) for _ in range(args.repeats)]
        rows[name] = (statistics.median(decode), statistics.median(agg))

    print(f"machine: {os.cpu_count()} CPU cores; jax {jax.__version__}, torch {torch.__version__}, "
          f"transformers {transformers.__version__}; engine programs compiled in {engine.compile_seconds:.1f} s")
    print(f"{'':14}{'batch 1 decode tok/s':>24}{'16 concurrent output tok/s':>30}")
    for name, (d, a) in rows.items():
        print(f"{name:14}{d:24.1f}{a:30.1f}")
    ours, theirs = rows["meshserve"], rows["transformers"]
    print(f"ratio meshserve/transformers: batch 1 {ours[0] / theirs[0]:.2f}x, "
          f"16 concurrent {ours[1] / theirs[1]:.2f}x")


if __name__ == "__main__":
    main()
