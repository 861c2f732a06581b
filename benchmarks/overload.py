"""`meshserve serve` under four times the load it can carry, from mixed clients, for a minute.

    python benchmarks/overload.py [--model CKPT_DIR] [--seconds 60] [--factor 4]

First the server's capacity is measured: `max_num_seqs` closed-loop clients sending the typical
request (a short prompt, 32 tokens out) for `--calibrate` seconds give the completions per second
it sustains. Then requests arrive at `--factor` times that rate (Poisson arrivals, open loop: a
client does not wait for the server before sending the next) for `--seconds`, drawn from five
kinds of client:

    short    a short prompt, streamed (its time to first token is measured)
    long     a prompt near 400 words, not streamed
    chat     a chat completion, streamed
    fanout   4 prompts × n=2 in one call: 8 sequences admitted, or refused, together
    quitter  streams, and hangs up after 3 chunks

What it checks and prints: that every request ended (a result, a 429, or another answer in the
OpenAI error envelope — never a hang, a 5xx or a dropped connection), that the server's KV pages
in use and running requests return to 0 once the load stops, the server's RSS after warm-up
against its peak and its end (it should stay flat: nothing grows per request), and the time to
first token of the admitted streams (p50, p99). The summary table is printed last.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from local_server import start_server  # noqa: E402

WORDS = ("the quick brown fox jumps over a lazy dog while seven wise owls watch from an old oak tree near the "
         "river bank under a pale autumn sky").split()
KINDS = {"short": 4, "long": 2, "chat": 2, "fanout": 1, "quitter": 1}  # weights of the mix


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def words(n: int, rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def request_of(kind: str, rng: random.Random) -> tuple[str, dict]:
    if kind == "short":
        return "/v1/completions", {"prompt": words(16, rng), "max_tokens": 16, "stream": True}
    if kind == "long":
        return "/v1/completions", {"prompt": words(400, rng), "max_tokens": 32}
    if kind == "chat":
        return "/v1/chat/completions", {"messages": [{"role": "user", "content": words(24, rng)}], "max_tokens": 24,
                                        "stream": True}
    if kind == "fanout":
        return "/v1/completions", {"prompt": [words(12, rng) for _ in range(4)], "n": 2, "max_tokens": 8}
    return "/v1/completions", {"prompt": words(16, rng), "max_tokens": 64, "stream": True}  # quitter


async def send(session: aiohttp.ClientSession, base: str, kind: str, rng: random.Random, timeout: float) -> dict:
    """One request to its end: {kind, status, ttft, seconds, complete}; status "timeout" or
    "connection" when the server never answered."""
    path, body = request_of(kind, rng)
    body = {"temperature": 0.7, **body}
    t0 = time.monotonic()
    result = {"kind": kind, "status": None, "ttft": None, "complete": False}
    try:
        async with asyncio.timeout(timeout):
            async with session.post(base + path, json=body) as resp:
                result["status"] = resp.status
                if resp.status != 200:
                    error = (await resp.json(content_type=None))["error"]  # the envelope, or this raises
                    result["complete"] = bool(error["message"])
                elif body.get("stream"):
                    chunks = 0
                    async for line in resp.content:
                        if not line.startswith(b"data: "):
                            continue
                        if line.strip() == b"data: [DONE]":
                            result["complete"] = True
                            break
                        chunks += 1
                        if result["ttft"] is None and _has_text(json.loads(line[6:])):
                            result["ttft"] = time.monotonic() - t0
                        if kind == "quitter" and chunks == 3:
                            result["complete"] = True  # it hung up: the server must free what it held
                            break
                else:
                    answer = await resp.json()
                    result["complete"] = all(c.get("finish_reason") for c in answer["choices"])
    except TimeoutError:
        result["status"] = "timeout"
    except (aiohttp.ClientError, KeyError, ValueError) as e:
        result["status"] = result["status"] or "connection"
        result["error"] = repr(e)
    result["seconds"] = time.monotonic() - t0
    return result


def _has_text(chunk: dict) -> bool:
    """Whether a streamed chunk carries generated text (a chat stream's first chunk has only the role)."""
    choice = (chunk.get("choices") or [{}])[0]
    return bool(choice.get("text") or (choice.get("delta") or {}).get("content"))


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def metric(base: str, series: str) -> float:
    with urllib.request.urlopen(base + "/metrics", timeout=10) as r:
        text = r.read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(series))


async def calibrate(base: str, clients: int, seconds: float) -> float:
    """Completions per second the server sustains with `clients` closed-loop clients."""
    rng, done = random.Random(1), []
    end = time.monotonic() + seconds

    async def client(session):
        while time.monotonic() < end:
            path, body = "/v1/completions", {"prompt": words(16, rng), "max_tokens": 32}
            async with session.post(base + path, json=body) as resp:
                await resp.read()
                if resp.status == 200:
                    done.append(time.monotonic())

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(client(session) for _ in range(clients)))
    return len(done) / seconds


async def overload(base: str, rate: float, seconds: float, timeout: float, pid: int) -> tuple[list[dict], list]:
    rng = random.Random(7)
    kinds = [k for k, w in KINDS.items() for _ in range(w)]
    tasks, rss = [], []
    start = time.monotonic()
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        next_at, next_rss = start, start
        while time.monotonic() - start < seconds:
            now = time.monotonic()
            if now >= next_rss:
                rss.append((now - start, rss_mib(pid)))
                next_rss += 1.0
            if now >= next_at:
                tasks.append(asyncio.create_task(send(session, base, rng.choice(kinds), rng, timeout)))
                next_at += rng.expovariate(rate)
            await asyncio.sleep(max(0.0, min(next_at, next_rss) - time.monotonic()))
        results = await asyncio.gather(*tasks)
    rss.append((time.monotonic() - start, rss_mib(pid)))
    return results, rss


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint folder (default: the default model)")
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--factor", type=float, default=4.0, help="offered load over the measured capacity")
    ap.add_argument("--calibrate", type=float, default=20)
    ap.add_argument("--warmup", type=float, default=15, help="seconds of the overload before RSS is taken as base")
    ap.add_argument("--timeout", type=float, default=300, help="a request not ended by then is a failure")
    ap.add_argument("--max-num-seqs", type=int, default=8)
    ap.add_argument("--max-queue-size", type=int, default=64)
    ap.add_argument("--host-kv-bytes", type=int, default=0,
                    help="the host tier (0 here: it would fill with prefix pages, a bounded but real growth of RSS)")
    args = ap.parse_args()

    if args.model is None:
        from meshserve.models.default import default_checkpoint

        args.model = str(default_checkpoint(progress=False))
    port, http_port = free_port(), free_port()
    engine = {"max_num_seqs": args.max_num_seqs, "max_queue_size": args.max_queue_size, "queue_timeout_s": None,
              "kv_store": None, "host_kv_bytes": args.host_kv_bytes}
    with tempfile.TemporaryDirectory() as folder:
        server = start_server(args.model, port, http_port, Path(folder), engine)
        base = f"http://127.0.0.1:{http_port}"
        try:
            capacity = asyncio.run(calibrate(base, args.max_num_seqs, args.calibrate))
            rate = args.factor * capacity
            print(f"capacity {capacity:.2f} completions/s with {args.max_num_seqs} clients; offering {rate:.2f} "
                  f"requests/s for {args.seconds:.0f} s", flush=True)
            results, rss = asyncio.run(overload(base, rate, args.seconds, args.timeout, server.pid))
            deadline, drained = time.monotonic() + 60, None
            while time.monotonic() < deadline:
                used, running = metric(base, "meshserve_kv_pages_used"), metric(base, "meshserve_requests_running")
                if used == 0 and running == 0:
                    drained = time.monotonic() - (deadline - 60)
                    break
                time.sleep(0.5)
            with urllib.request.urlopen(base + "/health", timeout=10) as r:
                health = r.status
        finally:
            server.terminate()
            server.wait(timeout=60)

    print()
    print(f"{'kind':8} {'sent':>5} {'200':>5} {'429':>5} {'4xx':>5} {'failed':>6} {'TTFT p50':>9} {'TTFT p99':>9}")
    failures = []
    for kind in [*KINDS, "all"]:
        mine = [r for r in results if kind in ("all", r["kind"])]
        ok = [r for r in mine if r["status"] == 200]
        refused = [r for r in mine if r["status"] == 429]
        other = [r for r in mine if isinstance(r["status"], int) and 400 <= r["status"] < 500 and r["status"] != 429]
        failed = [r for r in mine if r not in ok and r not in refused and r not in other or not r["complete"]]
        ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
        if kind == "all":
            failures = failed
        print(f"{kind:8} {len(mine):5d} {len(ok):5d} {len(refused):5d} {len(other):5d} {len(failed):6d} "
              f"{pct(ttft, 0.5):8.2f}s {pct(ttft, 0.99):8.2f}s")
    warm = [mib for t, mib in rss if t >= args.warmup]
    base_rss = warm[0] if warm else float("nan")
    print(f"RSS after {args.warmup:.0f} s warm-up {base_rss:.0f} MiB, peak after it {max(warm):.0f} MiB, "
          f"at the end {rss[-1][1]:.0f} MiB ({100 * (rss[-1][1] / base_rss - 1):+.1f} %)")
    print(f"KV pages in use and running requests back to 0: "
          f"{'yes, %.1f s after the load' % drained if drained is not None else 'NO'}; /health {health}")
    verdict = not failures and drained is not None and health == 200
    print(f"every request ended in a result, a 429 or a documented error: {'yes' if not failures else 'NO'}"
          f"{'' if not failures else ' — ' + json.dumps(failures[:3])}")
    sys.exit(0 if verdict else 1)


if __name__ == "__main__":
    main()
