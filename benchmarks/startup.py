"""Seconds from `meshserve serve` starting to its health saying SERVING, on the shipped config
(configs/serving/default.yaml, the default model), from an empty and from a warm compilation cache.

Each run starts a fresh server process on free loopback ports with the compilation cache in a
folder of its own: the first run of a folder is cold (every program compiled), the later ones warm
(read back from that cache). The server is stopped with SIGTERM after each run. The last lines
print the medians and how many programs the config compiles.

    .venv/bin/python benchmarks/startup.py [--repeats 3] [--config FILE]
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def time_to_serving(config: dict, cache: str, timeout: float) -> tuple[float, str]:
    """Start a server on `config` with its compilation cache in `cache`; seconds until /health
    says SERVING, and the programs line of its stats."""
    config = {**config, "engine": {**config["engine"], "compilation_cache_dir": cache},
              "server": {**config["server"], "port": free_port(), "http_port": free_port(), "metrics_port": None}}
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(config, f)
    http = f"http://127.0.0.1:{config['server']['http_port']}"
    t0 = time.perf_counter()
    server = subprocess.Popen([sys.executable, "-m", "meshserve.serving.cli", "serve", "--config", f.name, "--quiet"],
                              cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        while True:
            if server.poll() is not None:
                raise SystemExit(f"the server exited ({server.returncode}): {server.stderr.read()[-2000:]}")
            if time.perf_counter() - t0 > timeout:
                raise SystemExit(f"no SERVING after {timeout:.0f} s")
            try:
                with urllib.request.urlopen(f"{http}/health", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            time.sleep(0.05)
        elapsed = time.perf_counter() - t0
        with urllib.request.urlopen(f"{http}/metrics", timeout=5) as r:
            programs = next((line for line in r.read().decode().splitlines()
                             if line.startswith("meshserve_programs")), "")
        return elapsed, programs
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        os.unlink(f.name)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3, help="cold runs, and warm runs, each")
    ap.add_argument("--config", default=str(ROOT / "configs/serving/default.yaml"))
    ap.add_argument("--timeout", type=float, default=900)
    args = ap.parse_args()
    config = yaml.safe_load(Path(args.config).read_text())
    cold, warm, programs = [], [], ""
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as cache:
            seconds, programs = time_to_serving(config, cache, args.timeout)
            cold.append(seconds)
            warm.append(time_to_serving(config, cache, args.timeout)[0])
        print(f"cold {cold[-1]:.1f} s, warm {warm[-1]:.1f} s", flush=True)
    import jax

    print(f"machine: {os.cpu_count()} CPU cores; jax {jax.__version__}; config {Path(args.config).name}; {programs}")
    print(f"seconds to SERVING, median of {args.repeats}: empty compilation cache {statistics.median(cold):.1f}, "
          f"warm {statistics.median(warm):.1f}")


if __name__ == "__main__":
    main()
