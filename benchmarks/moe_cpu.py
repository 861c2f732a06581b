"""Mixture-of-experts speed on CPU: the engine against Hugging Face transformers `generate`, side by
side in one run, on one small Qwen3-MoE-shaped model with random weights (float32).

The model (see MODEL): Qwen3-30B-A3B's shape scaled down — hidden 512, 8 layers, 64 experts of width
192 with 8 picked per token (renormalised), q/k norm, 8 q / 2 kv heads of 64. transformers runs its
default experts implementation ("grouped_mm" in transformers 5) and, as a second row, its "eager" one,
which loops over the experts a batch hits.

Workloads, as benchmarks/engine_cpu.py's:
  batch 1:  decode tokens/s of one request (64-token prompt; time of 64 new tokens minus time of 1)
  batch 16: aggregate output tokens/s of 16 concurrent requests (64-token prompts, 64 new tokens,
            greedy), prefill included
Each figure is the median of --repeats runs; the last line prints ours / theirs.

    .venv/bin/python benchmarks/moe_cpu.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

import source_tree  # noqa: F401  (meshserve from this checkout when not installed)
from engine_cpu import CONCURRENT, NEW, prompts, time_ours, time_theirs

sys.path.append(str(source_tree.ROOT))  # tests.helpers: the byte-level test tokenizer

MODEL = dict(vocab_size=8192, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
             num_attention_heads=8, num_key_value_heads=2, head_dim=64, max_position_embeddings=512,
             num_experts=64, num_experts_per_tok=8, moe_intermediate_size=192, norm_topk_prob=True,
             rms_norm_eps=1e-6, tie_word_embeddings=False)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import jax
    import torch
    import transformers

    from meshserve.models.checkpoint import load_checkpoint
    from meshserve.models.convert import convert
    from meshserve.runtime.engine import Engine, EngineConfig
    from tests.helpers import write_tokenizer

    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(transformers.Qwen3MoeConfig(**MODEL)).float().eval()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "qwen3-moe-small"
        hf.save_pretrained(folder)
        write_tokenizer(folder)
        ckpt = load_checkpoint(convert(f"hf:{folder}", Path(tmp) / "ckpt", progress=False), progress=False)
    config = EngineConfig(max_seq_len=256, max_num_seqs=CONCURRENT, max_prefill_chunk=256,
                          max_num_batched_tokens=512, decode_buckets=(1, CONCURRENT), prefill_buckets=(64, 256))
    engine = Engine(ckpt, config)
    single = prompts(MODEL["vocab_size"], 1)
    many = prompts(MODEL["vocab_size"], CONCURRENT)

    def measure(fn, model) -> tuple[float, float]:
        fn(model, single, 2)  # warm-up
        decode = [(NEW - 1) / (fn(model, single, NEW) - fn(model, single, 1)) for _ in range(args.repeats)]
        agg = [CONCURRENT * NEW / fn(model, many, NEW) for _ in range(args.repeats)]
        return statistics.median(decode), statistics.median(agg)

    rows = {"meshserve": measure(time_ours, engine)}
    default = hf.config._experts_implementation
    rows[f"transformers ({default})"] = measure(time_theirs, hf)
    hf.set_experts_implementation("eager")
    rows["transformers (eager)"] = measure(time_theirs, hf)

    print(f"machine: {os.cpu_count()} CPU cores; jax {jax.__version__}, torch {torch.__version__}, "
          f"transformers {transformers.__version__}; {ckpt.config.num_params() / 1e6:.0f}M parameters, "
          f"{ckpt.config.num_params(active=True) / 1e6:.0f}M active; {len(engine.programs)} engine programs "
          f"compiled in {engine.compile_seconds:.1f} s")
    print(f"{'':28}{'batch 1 decode tok/s':>22}{'16 concurrent tok/s':>21}")
    for name, (d, a) in rows.items():
        print(f"{name:28}{d:22.1f}{a:21.1f}")
    ours = rows["meshserve"]
    print("ratio meshserve/transformers: " + "; ".join(
        f"{name.split(' ', 1)[1]} batch 1 {ours[0] / d:.2f}x, 16 concurrent {ours[1] / a:.2f}x"
        for name, (d, a) in rows.items() if name != "meshserve"))


if __name__ == "__main__":
    main()
