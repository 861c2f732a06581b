"""Load generator for a running meshserve server: fixed concurrency or a Poisson request rate.

Prompts are random token ids (no tokenizer needed) with lengths drawn from a distribution; in
shared-prefix mode every prompt starts with the same K tokens (what prefix caching serves). Each
request streams; per request we record time to first token (TTFT), the gaps between its later
tokens (inter-token latency, TTFT not folded in) and end-to-end latency.

    python benchmarks/serving.py --server localhost:50051 --concurrency 16 --requests 200
    python benchmarks/serving.py --http http://localhost:8000 ...   the same load on the OpenAI API
    python benchmarks/serving.py --server localhost:50051 --rate 4 --requests 200 --shared-prefix 512
    ... --prompt-len 32:512 --output-len 16:128 --out results.json --plot results.png

Prints p50/p90/p99 of TTFT, ITL and E2E and the request and token throughput; writes them (and every
request's record) as JSON, and a PNG of the three distributions.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import statistics
import sys
import time

import source_tree  # noqa: E402,F401  (meshserve from this checkout when not installed)

import grpc  # noqa: E402

from meshserve.serving.client import Client, SAMPLING_FIELDS  # noqa: E402,F401
from meshserve.serving.proto.meshserve.v1 import generation_pb2 as pb  # noqa: E402
from meshserve.serving.proto.meshserve.v1 import generation_pb2_grpc as pb_grpc  # noqa: E402


def length_range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition(":")
    lo, hi = int(lo), int(hi or lo)
    if not 1 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"expected N or LO:HI with 1 <= LO <= HI, got {text!r}")
    return lo, hi


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": float("nan"), "p90": float("nan"), "p99": float("nan"), "mean": float("nan")}
    q = statistics.quantiles(values, n=100, method="inclusive") if len(values) > 1 else [values[0]] * 99
    return {"p50": q[49], "p90": q[89], "p99": q[98], "mean": statistics.fmean(values)}


async def one_request(stub, request: pb.GenerateRequest, metadata, timeout: float) -> dict:
    sent = time.perf_counter()
    times, tokens, error = [], 0, None
    try:
        async for resp in stub.Generate(request, metadata=metadata, timeout=timeout):
            if resp.token_ids:
                times.append(time.perf_counter())
                tokens += len(resp.token_ids)
    except grpc.aio.AioRpcError as e:
        error = f"{e.code().name}: {e.details()}"
    end = time.perf_counter()
    return {"prompt_tokens": len(request.token_ids), "output_tokens": tokens, "error": error,
            "ttft_s": times[0] - sent if times else None,
            "itl_s": [b - a for a, b in zip(times, times[1:])], "e2e_s": end - sent, "start_s": sent,
            "token_times_s": times}


async def one_http_request(session, url: str, body: dict, headers: dict, timeout: float) -> dict:
    """One streamed /v1/completions call; a chunk's arrival time counts for each token it carries
    (continuous usage stats give the running count)."""
    sent = time.perf_counter()
    times, tokens, error = [], 0, None
    try:
        async with session.post(url, json=body, headers=headers, timeout=timeout) as resp:
            if resp.status != 200:
                error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
            else:
                async for line in resp.content:
                    if not line.startswith(b"data: {"):
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        error = chunk["error"]["message"]
                        break
                    count = chunk["usage"]["completion_tokens"]
                    if count > tokens:
                        times.extend([time.perf_counter()] * (count - tokens))
                        tokens = count
    except Exception as e:  # a broken connection: a failed request
        error = f"{type(e).__name__}: {e}"
    end = time.perf_counter()
    return {"prompt_tokens": len(body["prompt"]), "output_tokens": tokens, "error": error,
            "ttft_s": times[0] - sent if times else None,
            "itl_s": [b - a for a, b in zip(times, times[1:]) if b > a], "e2e_s": end - sent, "start_s": sent,
            "token_times_s": sorted(set(times))}


async def run(args) -> dict:
    rng = random.Random(args.seed)
    prefix = [rng.randrange(args.vocab_lo, args.vocab_hi) for _ in range(args.shared_prefix)]
    requests = []
    for _ in range(args.requests):
        n = rng.randint(*args.prompt_len)
        ids = prefix + [rng.randrange(args.vocab_lo, args.vocab_hi) for _ in range(n)]
        out = rng.randint(*args.output_len)
        requests.append(pb.GenerateRequest(token_ids=ids, sampling=pb.SamplingOptions(
            max_tokens=out, ignore_eos=True, temperature=args.temperature)))
    metadata = (("authorization", f"Bearer {args.token}"),) if args.token else None
    async with contextlib.AsyncExitStack() as stack:
        if args.http:
            import aiohttp

            session = await stack.enter_async_context(aiohttp.ClientSession())
            headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
            async with session.get(args.http + "/v1/models", headers=headers) as resp:
                model = (await resp.json())["data"][0]["id"]
            info = pb.ModelInfoResponse(name=model, mesh="(HTTP)")
            url = args.http + "/v1/completions"

            def send(req):
                body = {"model": model, "prompt": list(req.token_ids), "max_tokens": req.sampling.max_tokens,
                        "temperature": req.sampling.temperature, "ignore_eos": True, "stream": True,
                        "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
                return one_http_request(session, url, body, headers, args.timeout)
        else:
            channel = await stack.enter_async_context(grpc.aio.insecure_channel(args.server))
            stub = pb_grpc.GenerationStub(channel)
            info = await stub.ModelInfo(pb.ModelInfoRequest(), metadata=metadata)

            def send(req):
                return one_request(stub, req, metadata, args.timeout)
        t0 = time.perf_counter()
        long_task = None
        if args.long_prompt:  # one long prompt arriving while the load runs: how long do streams stall?
            long_ids = [rng.randrange(args.vocab_lo, args.vocab_hi) for _ in range(args.long_prompt)]
            long_req = pb.GenerateRequest(token_ids=long_ids, sampling=pb.SamplingOptions(
                max_tokens=1, ignore_eos=True, temperature=args.temperature))

            async def long_one():
                await asyncio.sleep(args.long_after)
                return await send(long_req)

            long_task = asyncio.ensure_future(long_one())
        if args.rate:  # open loop: Poisson arrivals, whatever the server's pace
            tasks = []
            for req in requests:
                tasks.append(asyncio.ensure_future(send(req)))
                await asyncio.sleep(rng.expovariate(args.rate))
            records = await asyncio.gather(*tasks)
        else:  # closed loop: `concurrency` clients, each sending its next request when one ends
            queue = list(requests)
            records = []

            async def worker():
                while queue:
                    records.append(await send(queue.pop(0)))

            await asyncio.gather(*[worker() for _ in range(args.concurrency)])
        elapsed = time.perf_counter() - t0
        long_record = await long_task if long_task is not None else None
    ok = [r for r in records if r["error"] is None]
    out_tokens = sum(r["output_tokens"] for r in ok)
    summary = {
        "model": info.name, "mesh": info.mesh, "server": args.http or args.server,
        "mode": f"rate {args.rate}/s" if args.rate else f"concurrency {args.concurrency}",
        "requests": len(records), "failed": len(records) - len(ok), "shared_prefix": args.shared_prefix,
        "prompt_len": args.prompt_len, "output_len": args.output_len, "elapsed_s": elapsed,
        "request_throughput": len(ok) / elapsed, "output_token_throughput": out_tokens / elapsed,
        "ttft_s": percentiles([r["ttft_s"] for r in ok if r["ttft_s"] is not None]),
        "itl_s": percentiles([x for r in ok for x in r["itl_s"]]),
        "e2e_s": percentiles([r["e2e_s"] for r in ok]),
        "errors": sorted({r["error"] for r in records if r["error"]}),
    }
    if long_record is not None:
        summary["long_prompt"] = long_effect(long_record, ok, summary["itl_s"]["p50"])
    return {"summary": summary, "records": records, "long_record": long_record}


def long_effect(long: dict, records: list[dict], itl_p50: float) -> dict:
    """The long prompt's TTFT, and the largest gap between two tokens of any stream while it was
    being computed (from its arrival to its first token), against the median gap of the run."""
    if long["error"] is not None or long["ttft_s"] is None:
        return {"error": long["error"] or "no token"}
    start, first = long["start_s"], long["start_s"] + long["ttft_s"]
    gaps = [b - a for r in records for a, b in zip(r["token_times_s"], r["token_times_s"][1:])
            if b > start and a < first]
    largest = max(gaps, default=float("nan"))
    return {"prompt_tokens": long["prompt_tokens"], "ttft_s": long["ttft_s"], "largest_gap_s": largest,
            "itl_p50_s": itl_p50, "largest_gap_over_p50": largest / itl_p50}


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in result["records"] if r["error"] is None]
    series = {"time to first token": [r["ttft_s"] for r in ok if r["ttft_s"] is not None],
              "inter-token latency": [x for r in ok for x in r["itl_s"]],
              "end-to-end latency": [r["e2e_s"] for r in ok]}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, (name, values) in zip(axes, series.items()):
        if values:
            xs = sorted(v * 1000 for v in values)
            ax.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))])
            for p in (50, 90, 99):
                ax.axvline(xs[min(len(xs) - 1, int(len(xs) * p / 100))], ls=":", c="gray")
        ax.set_title(name)
        ax.set_xlabel("ms")
        ax.set_ylabel("fraction of samples")
        ax.grid(alpha=0.3)
    s = result["summary"]
    fig.suptitle(f"{s['model']} on {s['mesh']}, {s['mode']}: {s['request_throughput']:.2f} req/s, "
                 f"{s['output_token_throughput']:.1f} tok/s")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--server", default="localhost:50051")
    p.add_argument("--http", default=None, metavar="URL", help="the OpenAI API at URL instead of gRPC")
    p.add_argument("--token", default=os.environ.get("MESHSERVE_TOKEN"))
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--concurrency", type=int, default=8)
    mode.add_argument("--rate", type=float, default=None, help="requests per second (Poisson)")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--prompt-len", type=length_range, default=(16, 128), metavar="LO:HI")
    p.add_argument("--output-len", type=length_range, default=(16, 64), metavar="LO:HI")
    p.add_argument("--shared-prefix", type=int, default=0, metavar="K", help="tokens every prompt starts with")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--vocab-lo", type=int, default=100)
    p.add_argument("--vocab-hi", type=int, default=10000)
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON results")
    p.add_argument("--plot", default=None, help="PNG of the latency distributions")
    p.add_argument("--long-prompt", type=int, default=0, metavar="N",
                   help="also send one N-token prompt during the run; report the streams' largest gap meanwhile")
    p.add_argument("--long-after", type=float, default=5.0, metavar="S", help="when to send it (seconds)")
    args = p.parse_args(argv)
    result = asyncio.run(run(args))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    if args.plot:
        plot(result, args.plot)
    s = result["summary"]
    print(f"{s['model']} ({s['mesh']}), {s['mode']}, {s['requests']} requests "
          f"({s['failed']} failed), prompts {s['prompt_len']} + prefix {s['shared_prefix']}, "
          f"outputs {s['output_len']}")
    print(f"{'':>8} {'p50 ms':>10} {'p90 ms':>10} {'p99 ms':>10}")
    for key, name in (("ttft_s", "TTFT"), ("itl_s", "ITL"), ("e2e_s", "E2E")):
        q = s[key]
        print(f"{name:>8} {q['p50'] * 1e3:>10.1f} {q['p90'] * 1e3:>10.1f} {q['p99'] * 1e3:>10.1f}")
    print(f"throughput: {s['request_throughput']:.2f} req/s, {s['output_token_throughput']:.1f} output tok/s")
    print(f"ITL p99 / p50: {s['itl_s']['p99'] / s['itl_s']['p50']:.2f}")
    if "long_prompt" in s:
        lp = s["long_prompt"]
        if "error" in lp:
            print(f"long prompt failed: {lp['error']}")
        else:
            print(f"long prompt of {lp['prompt_tokens']} tokens: TTFT {lp['ttft_s'] * 1e3:.0f} ms; the streams' "
                  f"largest gap meanwhile {lp['largest_gap_s'] * 1e3:.0f} ms = {lp['largest_gap_over_p50']:.2f}x "
                  f"their median gap")
    return 0 if not s["failed"] else 1


if __name__ == "__main__":
    sys.exit(main())
