"""Engine speed on CPU against Hugging Face transformers `generate`, side by side in one run.

Workloads, on the default model (SmolLM2-135M-Instruct, float32, both sides read the same GGUF):
  batch 1:  decode tokens/s of one request (64-token prompt; time of 64 new tokens minus time of 1)
  batch 16: aggregate output tokens/s of 16 concurrent requests (64-token prompts, 64 new tokens,
            greedy), prefill included
  long prompt: time to the first token of one cold 2,000-token prompt, against transformers' single
            forward pass over the same 2,000 tokens
Each figure is the median of --repeats runs. The last line prints the three ratios (ours /
transformers; for the long prompt, transformers' time / ours, so above 1 is better everywhere).

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

PROMPT, NEW, CONCURRENT, LONG = 64, 64, 16, 2000


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


def ttft_ours(engine, prompt: list[int]) -> float:
    from meshserve.runtime.sampling import SamplingParams

    engine.evict_prefix_cache()  # cold: nothing of it cached
    t = time.perf_counter()
    engine.generate([prompt], SamplingParams(max_tokens=1))
    return time.perf_counter() - t


def forward_theirs(model, prompt: list[int]) -> float:
    import torch

    ids = torch.tensor([prompt])
    with torch.inference_mode():
        t = time.perf_counter()
        model(ids)
        return time.perf_counter() - t


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
    config = EngineConfig(max_seq_len=LONG + NEW, max_num_seqs=CONCURRENT, max_prefill_chunk=256,
                          max_num_batched_tokens=512, decode_buckets=(1, CONCURRENT), prefill_buckets=(64, 256),
                          compilation_cache_dir=str(cache_dir() / "xla"))
    engine = Engine(ckpt, config)
    single = prompts(ckpt.config.vocab_size, 1)
    many = prompts(ckpt.config.vocab_size, CONCURRENT)

    # warm-up both sides once
    time_ours(engine, single, 2), time_theirs(hf, single, 2)
    long = np.random.default_rng(1).integers(100, ckpt.config.vocab_size - 100, LONG).tolist()
    rows = {}
    for name, fn, first, model in (("meshserve", time_ours, ttft_ours, engine),
                                   ("transformers", time_theirs, forward_theirs, hf)):
        decode = [(NEW - 1) / (fn(model, single, NEW) - fn(model, single, 1)) for _ in range(args.repeats)]
        agg = [CONCURRENT * NEW / fn(model, many, NEW) for _ in range(args.repeats)]
        ttft = [first(model, long) for _ in range(args.repeats)]
        rows[name] = (statistics.median(decode), statistics.median(agg), statistics.median(ttft))

    print(f"machine: {os.cpu_count()} CPU cores; jax {jax.__version__}, torch {torch.__version__}, "
          f"transformers {transformers.__version__}; {len(engine.programs)} engine programs compiled in "
          f"{engine.compile_seconds:.1f} s")
    print(f"{'':14}{'batch 1 decode tok/s':>22}{'16 concurrent tok/s':>21}{'2,000-token prompt s':>22}")
    for name, (d, a, f) in rows.items():
        print(f"{name:14}{d:22.1f}{a:21.1f}{f:22.2f}   ({'first token' if name == 'meshserve' else 'one forward'})")
    ours, theirs = rows["meshserve"], rows["transformers"]
    print(f"ratio meshserve/transformers: batch 1 {ours[0] / theirs[0]:.2f}x, "
          f"16 concurrent {ours[1] / theirs[1]:.2f}x, long-prompt TTFT {theirs[2] / ours[2]:.2f}x "
          f"(their forward / our first token)")


if __name__ == "__main__":
    main()
