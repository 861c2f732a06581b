"""A real load tool against the OpenAI-compatible API beside meshserve's own gRPC load generator,
at the same load, on one server, in one run.

    make bench-load
    python benchmarks/openai_load.py [--concurrency 8] [--requests 64] [--input 128] [--output 64]

The tool is NVIDIA's aiperf (AIPerf, Dynamo's benchmark client): this script installs it, pinned,
into its own virtual environment (benchmarks/.venv-aiperf, from locks/aiperf.txt) on first use — its dependencies pin
versions meshserve's environment does not have (prometheus-client, pillow…), and it only talks HTTP.
`vllm bench serve` was not chosen: it needs vLLM itself, a CUDA build with no CPU wheel on PyPI.

Every run uses random prompts of `--input` tokens, `--output` tokens each (EOS ignored), streamed,
at a fixed concurrency, after a warm-up. What the HTTP layer costs is read from the same client on
both APIs — benchmarks/serving.py on gRPC and on /v1/completions, alternated, `--repeats` times —
since aiperf (several processes) competes with the server for the CPU on a small machine. The
table printed last gives TTFT and ITL p50/p99 and output token throughput of each, and HTTP's
throughput as a fraction of gRPC's.
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
import urllib.request
from pathlib import Path

import locked_venv

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / "benchmarks" / ".venv-aiperf"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def aiperf() -> Path:
    return locked_venv.ensure(VENV, "aiperf.txt", "aiperf").parent / "aiperf"


def run_aiperf(args, http_port: int, model_name: str, tokenizer: str, out: Path) -> dict:
    cmd = [str(aiperf()), "profile", "--model", model_name, "--url", f"http://127.0.0.1:{http_port}",
           "--endpoint-type", "completions", "--streaming", "--tokenizer", tokenizer,
           "--concurrency", str(args.concurrency), "--request-count", str(args.requests),
           "--warmup-request-count", str(args.concurrency), "--random-seed", "0",
           "--prompt-input-tokens-mean", str(args.input), "--prompt-input-tokens-stddev", "0",
           "--prompt-output-tokens-mean", str(args.output), "--prompt-output-tokens-stddev", "0",
           "--extra-inputs", "ignore_eos:true", "--output-artifact-dir", str(out), "--no-auto-plot",
           # as few processes as it runs with: it shares this machine's cores with the server
           "--workers-max", "1", "--record-processor-service-count", "1", "--no-server-metrics",
           "--no-gpu-telemetry", "--ui-type", "none"]
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}  # offline, it takes no local folder
    subprocess.run(cmd, check=True, cwd=out, env=env)
    export = next(out.rglob("profile_export_aiperf.json"))
    return json.loads(export.read_text())


def run_ours(args, target: list[str], out: Path) -> dict:
    """benchmarks/serving.py at the same load, on gRPC (`--server`) or the OpenAI API (`--http`)."""
    path = out / "ours.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks/serving.py"), *target,
                    "--concurrency", str(args.concurrency), "--requests", str(args.requests),
                    "--prompt-len", str(args.input), "--output-len", str(args.output), "--out", str(path)],
                   check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return json.loads(path.read_text())["summary"]


def _metric(data: dict, name: str, stat: str) -> float:
    """A statistic of one of aiperf's metrics, in seconds for latencies (it reports milliseconds)."""
    value = data[name][stat]
    return value / 1000 if data[name].get("unit") == "ms" else value


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="checkpoint folder (default: the default model)")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--input", type=int, default=128, help="prompt tokens")
    p.add_argument("--output", type=int, default=64, help="output tokens")
    p.add_argument("--repeats", type=int, default=3, help="serving.py runs per API")
    p.add_argument("--out", default=None, help="JSON of every summary")
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import source_tree  # noqa: F401  (meshserve from this checkout when not installed)
    from local_server import start_server

    from meshserve.models.default import default_checkpoint

    model = args.model or str(default_checkpoint())
    aiperf()  # installed before the server starts: its start-up is not timed
    port, http_port = free_port(), free_port()
    with tempfile.TemporaryDirectory() as tmp:
        server = start_server(model, port, http_port, Path(tmp),
                              dict(max_num_seqs=args.concurrency, decode_buckets=[args.concurrency]), timeout_s=900)
        try:
            name = json.load(urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v1/models"))["data"][0]["id"]
            grpc_target, http_target = ["--server", f"127.0.0.1:{port}"], ["--http", f"http://127.0.0.1:{http_port}"]
            run_ours(argparse.Namespace(**{**vars(args), "requests": args.concurrency}), grpc_target, Path(tmp))  # warm-up
            runs = {"gRPC, serving.py": [], "HTTP, serving.py": []}
            for _ in range(args.repeats):  # alternated, so drift on a shared machine hits both alike
                runs["gRPC, serving.py"].append(run_ours(args, grpc_target, Path(tmp)))
                runs["HTTP, serving.py"].append(run_ours(args, http_target, Path(tmp)))
            http = run_aiperf(args, http_port, name, model, Path(tmp))
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=120)
    def median_run(summaries: list[dict]) -> dict:  # the run of median throughput
        return sorted(summaries, key=lambda s: s["output_token_throughput"])[len(summaries) // 2]

    rows = [(label, s["ttft_s"]["p50"], s["ttft_s"]["p99"], s["itl_s"]["p50"], s["itl_s"]["p99"],
             s["output_token_throughput"]) for label, s in ((k, median_run(v)) for k, v in runs.items())]
    rows.append(("HTTP, aiperf", _metric(http, "time_to_first_token", "p50"),
                 _metric(http, "time_to_first_token", "p99"), _metric(http, "inter_token_latency", "p50"),
                 _metric(http, "inter_token_latency", "p99"), http["output_token_throughput"]["avg"]))
    ratios = sorted(h["output_token_throughput"] / g["output_token_throughput"]
                    for g, h in zip(runs["gRPC, serving.py"], runs["HTTP, serving.py"]))
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "ours": runs, "aiperf": http}, indent=1))
    print(f"concurrency {args.concurrency}, {args.requests} requests of {args.input} prompt + {args.output} "
          f"output tokens; serving.py runs: {args.repeats} each, alternated (median shown)")
    print(f"{'API, client':<20}{'TTFT p50':>10}{'p99':>8}{'ITL p50':>10}{'p99':>8}{'out tok/s':>11}")
    for label, t50, t99, i50, i99, tps in rows:
        print(f"{label:<20}{t50 * 1000:>8.0f}ms{t99 * 1000:>6.0f}ms{i50 * 1000:>8.1f}ms{i99 * 1000:>6.1f}ms{tps:>11.1f}")
    print(f"HTTP / gRPC output throughput, same client, paired runs: median {ratios[len(ratios) // 2]:.3f} "
          f"(all: {', '.join(f'{r:.3f}' for r in ratios)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
