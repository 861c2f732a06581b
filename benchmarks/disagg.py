"""Aggregated against disaggregated serving: the same two worker processes behind the same Dynamo
frontend, either both `--role both` (KV router) or one `--role prefill` and one `--role decode`,
in one run.

Workload: a mix of long prompts with short answers and short prompts with long generations (greedy,
ignore EOS), Poisson arrivals at --rate requests/s, token ids sent as the prompt. Printed per mode:
TTFT p50/p99, gaps between tokens (ITL) p50/p99 over every stream, output tokens/s; for the
disaggregated mode, the prompts whose pages moved, the pages and bytes, and the pull time and
rate (the decode worker's meshserve_kv_pull_seconds). Last line: disaggregated / aggregated.

On a 2-core CPU both modes share the cores, and moving a page costs about as much as computing it:
this reports; the speed targets are for a GPU.

    .venv/bin/python benchmarks/disagg.py [--requests 32] [--rate 0.5]
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
MODES = {"aggregated": ("both", "both"), "disaggregated": ("prefill", "decode")}


async def one(client, prompt: list[int], out_tokens: int, start: float, results: list) -> None:
    await asyncio.sleep(max(0.0, start - time.monotonic()))
    sent = time.monotonic()
    times = []
    stream = await client.completions.create(model="m", prompt=prompt, max_tokens=out_tokens, temperature=0,
                                             stream=True, stream_options={"include_usage": True},
                                             extra_body={"ignore_eos": True})
    usage = None
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            times.append(time.monotonic())
        usage = chunk.usage or usage
    results.append((times[0] - sent, [b - a for a, b in zip(times, times[1:])], usage.completion_tokens))


def run_mode(mode: str, args, requests: list[tuple[float, list[int], int]]) -> dict:
    import openai
    import yaml

    from meshserve.serving.fleet import LocalFleet, free_port

    folder = Path(tempfile.mkdtemp(prefix=f"meshserve-disagg-{mode}-"))
    config = yaml.safe_load((ROOT / "configs/serving/default.yaml").read_text())
    config["engine"].update(max_seq_len=2048, host_kv_bytes=0, prefill_tokens_while_decoding=None)
    (folder / "serving.yaml").write_text(yaml.safe_dump(config))
    port = free_port()
    fleet = LocalFleet(folder, port, "kv", migration_limit=0)
    try:
        for name, role in zip(("w0", "w1"), MODES[mode]):
            fleet.start_worker(name, ["--config", str(folder / "serving.yaml"), "--model-name", "m", "--role", role,
                                      "--component", "prefill" if role == "prefill" else "backend"], metrics=True)
        time.sleep(3)  # the frontend sees both workers

        async def main():
            results: list = []
            async with openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0,
                                          timeout=900) as client:
                t0 = time.monotonic()
                await asyncio.gather(*(one(client, prompt, n, t0 + at, results) for at, prompt, n in requests))
                return results, time.monotonic() - t0

        results, wall = asyncio.run(main())
        moved = {}
        if mode == "disaggregated":
            metric = lambda series: fleet.metric("w1", series)  # noqa: E731
            moved = {"prompts": metric('meshserve_kv_transfers_total{outcome="pulled"'),
                     "failed": metric('meshserve_kv_transfers_total{outcome="failed"'),
                     "pages": metric("meshserve_kv_transfer_pages_total"),
                     "bytes": metric("meshserve_kv_transfer_bytes_total"),
                     "seconds": metric("meshserve_kv_pull_seconds_sum")}
    finally:
        fleet.stop()
    ttft = sorted(r[0] for r in results)
    gaps = sorted(g for r in results for g in r[1])
    pct = lambda xs, q: xs[min(len(xs) - 1, int(q * len(xs)))]  # noqa: E731
    return {"ttft_p50": statistics.median(ttft), "ttft_p99": pct(ttft, 0.99), "itl_p50": statistics.median(gaps),
            "itl_p99": pct(gaps, 0.99), "tok_s": sum(r[2] for r in results) / wall, "moved": moved}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--rate", type=float, default=0.5, help="Poisson arrivals, requests/s")
    ap.add_argument("--long-prompt", type=int, default=1000, help="tokens of a long prompt (half the requests)")
    ap.add_argument("--long-output", type=int, default=128, help="tokens generated for a short prompt")
    args = ap.parse_args()
    rng = random.Random(0)
    at, requests = 0.0, []
    for i in range(args.requests):
        at += rng.expovariate(args.rate)
        if i % 2:  # a long prompt, a short answer
            requests.append((at, [rng.randrange(1, 40000) for _ in range(args.long_prompt)], 16))
        else:  # a short prompt, a long generation
            requests.append((at, [rng.randrange(1, 40000) for _ in range(32)], args.long_output))
    figures = {mode: run_mode(mode, args, requests) for mode in MODES}
    print(f"2 workers on one machine; {args.requests} requests at {args.rate}/s: half {args.long_prompt}-token "
          f"prompts → 16 tokens, half 32-token prompts → {args.long_output} tokens")
    print(f"{'mode':>14}{'TTFT p50 s':>12}{'TTFT p99 s':>12}{'ITL p50 ms':>12}{'ITL p99 ms':>12}{'tok/s':>8}")
    for mode, f in figures.items():
        print(f"{mode:>14}{f['ttft_p50']:12.2f}{f['ttft_p99']:12.2f}{f['itl_p50'] * 1e3:12.1f}"
              f"{f['itl_p99'] * 1e3:12.1f}{f['tok_s']:8.1f}")
    m = figures["disaggregated"]["moved"]
    if m.get("seconds"):
        print(f"moved: {int(m['prompts'])} prompts ({int(m['failed'])} failed), {int(m['pages'])} pages, "
              f"{m['bytes'] / 2**20:.1f} MiB in {m['seconds']:.2f} s of pulls: {m['bytes'] / m['seconds'] / 1e9:.2f} GB/s, "
              f"{m['bytes'] / max(m['prompts'], 1) / 2**20:.2f} MiB per prompt")
    agg, dis = figures["aggregated"], figures["disaggregated"]
    print(f"disaggregated / aggregated: ITL p99 {dis['itl_p99'] / agg['itl_p99']:.2f}× (GPU target ≤ 0.5), "
          f"TTFT p99 {dis['ttft_p99'] / agg['ttft_p99']:.2f}×, throughput {dis['tok_s'] / agg['tok_s']:.2f}×")


if __name__ == "__main__":
    main()
