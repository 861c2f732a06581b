"""KV-aware routing against round-robin: the same meshserve workers behind the same Dynamo frontend,
only `--router-mode` changes, in one run.

Workload (scaled down from llm-d's shared-prefix benchmark): T tenants, each with a C-token context
that its U users share; every request is its tenant's context + a fresh Q-token question, O output
tokens (ignore EOS, greedy), arrivals Poisson at --rate requests/s. The workers' KV pools are sized
so that all the contexts take about --kv-demand of the pools together: a router that scatters a
tenant over both workers makes each hold every context and evict; one that follows the pages keeps
each tenant on one worker.

Printed per mode: TTFT p50/p90, output tokens/s, the share of prompt tokens served from the prefix
cache (the requests' usage), and the prefix-cache hit tokens each worker counted; last, the kv /
round-robin ratios.

    .venv/bin/python benchmarks/routing.py [--requests 48] [--rate 1.0 | --concurrency 8] [--workers 2]

The run docs/benchmarks.md quotes for the targets (a rate between the two modes' capacities on a
2-core machine): --rate 1.2 --requests 192 --kv-demand 0.7 --prefill-load-scale 4
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import tempfile
import time
from pathlib import Path

import source_tree  # noqa: F401  (meshserve from this checkout when not installed)

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("alpha", "bravo", "cedar", "delta", "ember", "fjord", "grove", "harbor", "island", "jungle", "kettle",
         "lantern", "meadow", "nectar", "orbit", "prairie", "quartz", "river", "summit", "timber")


def text_of(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


async def one(client, model: str, prompt: str, out_tokens: int, start: float, results: list) -> None:
    await asyncio.sleep(max(0.0, start - time.monotonic()))
    sent = time.monotonic()
    first = None
    stream = await client.completions.create(model=model, prompt=prompt, max_tokens=out_tokens, temperature=0,
                                             stream=True, stream_options={"include_usage": True},
                                             extra_body={"ignore_eos": True})
    usage = None
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            first = first or time.monotonic()
        usage = chunk.usage or usage
    results.append((first - sent, usage.completion_tokens, usage.prompt_tokens,
                    usage.prompt_tokens_details.cached_tokens))


def run_mode(mode: str, args, prompts: list[tuple[float, str]], engine: dict) -> dict:
    import openai
    import yaml

    from meshserve.serving.fleet import LocalFleet, free_port

    folder = Path(tempfile.mkdtemp(prefix=f"meshserve-routing-{mode}-"))
    config = yaml.safe_load((ROOT / "configs/serving/default.yaml").read_text())
    config["engine"].update(engine)
    (folder / "serving.yaml").write_text(yaml.safe_dump(config))
    port = free_port()
    router_env = {"DYN_ROUTER_KV_OVERLAP_SCORE_CREDIT": str(args.overlap_credit)} if args.overlap_credit else {}
    if args.prefill_load_scale:
        router_env["DYN_ROUTER_PREFILL_LOAD_SCALE"] = str(args.prefill_load_scale)
    fleet = LocalFleet(folder, port, mode, migration_limit=0, env=router_env)
    try:
        for i in range(args.workers):
            fleet.start_worker(f"w{i}", ["--config", str(folder / "serving.yaml"), "--model-name", "m"],
                               metrics=True)
        time.sleep(3)  # the frontend sees every worker

        async def main():
            results: list = []
            async with openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0,
                                          timeout=600) as client:
                t0 = time.monotonic()
                if args.concurrency:  # closed loop: N clients, each sends its next request when one ends
                    queue = list(prompts)

                    async def user():
                        while queue:
                            _, prompt = queue.pop(0)
                            await one(client, "m", prompt, args.output_len, 0.0, results)

                    await asyncio.gather(*(user() for _ in range(args.concurrency)))
                else:
                    await asyncio.gather(*(one(client, "m", prompt, args.output_len, t0 + at, results)
                                           for at, prompt in prompts))
                return results, time.monotonic() - t0

        series = 'meshserve_prefix_cache_hit_tokens_total{tier="device"}'
        hits_before = {w: fleet.metric(w, series) for w in fleet.workers}
        results, wall = asyncio.run(main())
        hits = {w: fleet.metric(w, series) - hits_before[w] for w in fleet.workers}
    finally:
        fleet.stop()
    ttft = sorted(r[0] for r in results)
    return {"ttft_p50": statistics.median(ttft), "ttft_p90": ttft[int(0.9 * (len(ttft) - 1))],
            "tok_s": sum(r[1] for r in results) / wall, "hits": hits, "wall": wall,
            "cached": sum(r[3] for r in results) / sum(r[2] for r in results)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--tenants", type=int, default=8)
    ap.add_argument("--users", type=int, default=3)
    ap.add_argument("--context-words", type=int, default=512, help="≈ tokens of each tenant's shared context")
    ap.add_argument("--question-words", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=16)
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--rate", type=float, default=1.0, help="Poisson arrivals, requests/s")
    ap.add_argument("--overlap-credit", type=float, help="the KV router's credit for cached prefix pages "
                    "(Dynamo's default 1.0): above 1 the prefix outweighs the load more")
    ap.add_argument("--prefill-load-scale", type=float, help="the KV router's weight of a worker's prefill work "
                    "against its decode load (Dynamo's default 1.0): on a CPU a prompt costs far more than a "
                    "decode step, so a cold prefix should weigh more")
    ap.add_argument("--concurrency", type=int, default=0,
                    help="instead of Poisson arrivals: N clients in a closed loop (saturates; measures capacity)")
    ap.add_argument("--kv-demand", type=float, default=0.7, help="contexts' pages / all workers' pages")
    args = ap.parse_args()

    from meshserve.models.checkpoint import read_meta
    from meshserve.models.default import default_checkpoint
    from meshserve.models.tokenizer import Tokenizer

    folder = default_checkpoint(progress=False)
    _, model, dtype = read_meta(folder)
    page_size = 16
    page_bytes = 2 * model.num_layers * model.num_kv_heads * model.head_dim * page_size * dtype.itemsize
    rng = random.Random(0)
    contexts = [text_of(rng, args.context_words) for _ in range(args.tenants)]
    tokenizer = Tokenizer.load(folder)  # the pages the contexts really take (a word is ~1.2 tokens)
    context_pages = sum(len(tokenizer.encode(c)) // page_size for c in contexts)
    pages_per_worker = int(context_pages / args.kv_demand / args.workers) + 1
    engine = {"page_size": page_size, "max_seq_len": 1024, "host_kv_bytes": 0, "prefill_tokens_while_decoding": None,
              "kv_cache_bytes": max(pages_per_worker, 1024 // page_size + 2) * page_bytes}
    users = [(t, u) for t in range(args.tenants) for u in range(args.users)]
    at, prompts = 0.0, []
    for _ in range(args.requests):
        at += rng.expovariate(args.rate)
        tenant, _user = rng.choice(users)
        prompts.append((at, contexts[tenant] + " question: " + text_of(rng, args.question_words)))
    figures = {mode: run_mode(mode, args, prompts, engine) for mode in ("round-robin", "kv")}
    print(f"{args.workers} workers, {pages_per_worker} pages each ({args.kv_demand:.0%} KV demand); {args.tenants} "
          f"tenants × {args.users} users, {args.context_words}-word contexts, {args.question_words}-word questions, "
          f"{args.output_len} output tokens, {args.requests} requests "
          + (f"from {args.concurrency} closed-loop clients" if args.concurrency else f"at {args.rate}/s"))
    print(f"{'router':>12}{'TTFT p50 s':>12}{'TTFT p90 s':>12}{'tok/s':>8}{'cached':>8}   prefix-cache hit tokens "
          "per worker (every admission, recomputations after preemption included)")
    for mode, f in figures.items():
        print(f"{mode:>12}{f['ttft_p50']:12.2f}{f['ttft_p90']:12.2f}{f['tok_s']:8.1f}{f['cached']:8.0%}   "
              + ", ".join(f"{w} {int(h)}" for w, h in f["hits"].items()))
    rr, kv = figures["round-robin"], figures["kv"]
    print(f"kv / round-robin: TTFT p90 {kv['ttft_p90'] / rr['ttft_p90']:.2f}× (target ≤ 0.5), "
          f"throughput {kv['tok_s'] / rr['tok_s']:.2f}× (target ≥ 1.3)")


if __name__ == "__main__":
    main()
