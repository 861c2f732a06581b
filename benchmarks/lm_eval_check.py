"""lm-evaluation-harness against meshserve's OpenAI-compatible API, beside transformers on the same
items in the same run.

    make bench-eval            # installs lm-eval (benchmarks/requirements-eval.txt), then runs this
    python benchmarks/lm_eval_check.py [--model CKPT_DIR] [--kv-cache-dtype int8] [--within 2]

Starts `meshserve serve` on the default model, runs the repository's multiple-choice task
(benchmarks/lm_eval_tasks/meshserve_mc.*) through lm-eval's `local-completions` model (echo + logprobs,
its remote tokenizer: /tokenize, /tokenizer_info), then scores every (context, continuation) pair
lm-eval sent with transformers (PyTorch, float32, the same GGUF file) and prints both accuracies,
the largest log-likelihood difference and how many answers agree. Exits 1 if the accuracies differ
by more than --within points (0: they must be equal; quantized weights or KV are allowed some).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import source_tree  # noqa: F401  (meshserve from this checkout when not installed)
from local_server import start_server

ROOT = Path(__file__).resolve().parents[1]
TASK = "meshserve_mc"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_lm_eval(http_port: int, model_name: str) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    args = {"base_url": f"http://127.0.0.1:{http_port}/v1/completions", "model": model_name,
            "tokenizer_backend": "remote", "tokenized_requests": True, "num_concurrent": 4, "max_retries": 3}
    return lm_eval.simple_evaluate(model="local-completions", model_args=args, tasks=[TASK],
                                   task_manager=TaskManager(include_path=str(ROOT / "benchmarks/lm_eval_tasks")),
                                   log_samples=True, batch_size=1)


def transformers_loglikelihoods(pairs: list[tuple[str, str]], tokenizer) -> list[float]:
    """Each continuation's log-likelihood after its context, encoded as lm-eval encodes a pair
    (trailing spaces of the context moved to the continuation, the whole encoded, then split)."""
    import torch
    from transformers import AutoModelForCausalLM

    from meshserve.models.default import default_gguf

    gguf = default_gguf()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    out = []
    for context, continuation in pairs:
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = tokenizer.encode(context + continuation, add_bos=False)
        ctx = tokenizer.encode(context, add_bos=False)
        with torch.no_grad():
            logits = model(torch.tensor([whole])).logits[0].float()
        logprobs = torch.log_softmax(logits, dim=-1)
        out.append(float(sum(logprobs[i - 1, whole[i]] for i in range(len(ctx), len(whole)))))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="checkpoint folder (default: the default model)")
    p.add_argument("--kv-cache-dtype", default="auto", help="the served engine's kv_cache_dtype")
    p.add_argument("--within", type=float, default=0.0, help="accuracy points the served model may differ by")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from meshserve.models.checkpoint import load_checkpoint
    from meshserve.models.default import default_checkpoint

    model = args.model or str(default_checkpoint())
    tokenizer = load_checkpoint(model, progress=False).tokenizer
    port, http_port = free_port(), free_port()
    with tempfile.TemporaryDirectory() as tmp:
        server = start_server(model, port, http_port, Path(tmp), dict(
            max_seq_len=256, max_num_seqs=8, max_num_batched_tokens=128, max_prefill_chunk=128,
            prefill_buckets=[32, 128], decode_buckets=[8], context_buckets=[16], kv_cache_dtype=args.kv_cache_dtype))
        try:
            name = json.load(urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v1/models"))["data"][0]["id"]
            t0 = time.perf_counter()
            results = run_lm_eval(http_port, name)
            eval_s = time.perf_counter() - t0
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=120)
    samples = sorted(results["samples"][TASK], key=lambda s: s["doc_id"])
    pairs = [tuple(arg) for s in samples for arg in s["arguments"]]
    served = [float(r[0][0]) for s in samples for r in s["resps"]]
    reference = transformers_loglikelihoods(pairs, tokenizer)
    at, agree, correct_served, correct_ref = 0, 0, 0, 0
    for s in samples:
        k = len(s["arguments"])
        ours, theirs = served[at:at + k], reference[at:at + k]
        at += k
        pick_ours, pick_ref = max(range(k), key=ours.__getitem__), max(range(k), key=theirs.__getitem__)
        agree += pick_ours == pick_ref
        correct_served += pick_ours == s["target"]
        correct_ref += pick_ref == s["target"]
    acc = results["results"][TASK]["acc,none"]
    worst = max(abs(a - b) for a, b in zip(served, reference))
    print(f"task {TASK}: {len(samples)} items, {len(pairs)} (context, continuation) pairs; lm-eval took {eval_s:.1f} s")
    print(f"{'scored by':<40}{'accuracy':>10}")
    print(f"{'lm-eval local-completions → meshserve':<40}{acc:>10.4f}")
    print(f"{'transformers (PyTorch f32, same GGUF)':<40}{correct_ref / len(samples):>10.4f}")
    print(f"max |Δ log-likelihood| {worst:.2e}; same answer on {agree}/{len(samples)} items; "
          f"lm-eval's accuracy from its own samples {correct_served / len(samples):.4f}")
    return 0 if abs(acc - correct_ref / len(samples)) * 100 <= args.within + 1e-9 else 1


if __name__ == "__main__":
    sys.exit(main())
