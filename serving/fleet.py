"""A Dynamo fleet on one machine, for trying it out: Dynamo's frontend (OpenAI HTTP API and its
KV-aware router) and N `meshserve worker` processes, with file discovery, the TCP request plane
and ZMQ events on loopback — no etcd, no NATS. `meshserve fleet --workers 2` (or `make fleet`).

Production runs the same processes with etcd + NATS (or Kubernetes) discovery, one worker per GPU or
per mesh, several frontends: docs/fleet.md.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from meshserve.models.errors import MeshserveError


def free_port(below: int | None = None) -> int:
    """A free loopback port; `below`: one under that bound (outside Linux's ephemeral range, for
    settings that take 16-bit signed ports, like DYN_SYSTEM_PORT)."""
    import random
    import socket

    while True:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", 0 if below is None else random.randrange(20000, below)))
            except OSError:
                continue
            return s.getsockname()[1]


def loopback_env(discovery: Path) -> dict[str, str]:
    """Dynamo's settings for processes of one machine: file discovery under `discovery`, every
    server bound to 127.0.0.1 (by default Dynamo binds a non-loopback address)."""
    return {"DYN_DISCOVERY_BACKEND": "file", "DYN_FILE_KV": str(discovery), "DYN_REQUEST_PLANE": "tcp",
            "DYN_EVENT_PLANE": "zmq", "DYN_TCP_RPC_HOST": "127.0.0.1", "DYN_TCP_RESPONSE_STREAM_HOST": "127.0.0.1",
            "DYN_EVENT_PLANE_HOST": "127.0.0.1"}


class LocalFleet:
    """The processes of a one-machine fleet, their logs in `folder`. `frontend_args`: more flags for
    Dynamo's frontend (e.g. its conditional disaggregation)."""

    def __init__(self, folder: Path, http_port: int, router: str = "kv", migration_limit: int = 3,
                 env: dict[str, str] | None = None, frontend_args: list[str] = ()):
        self.folder = folder
        self.http_port = http_port
        self.env = {**os.environ, **loopback_env(folder / "discovery"), **(env or {})}
        self.frontends: dict[str, subprocess.Popen] = {}
        self.frontend = self.start_frontend("frontend", http_port, ["--router-mode", router, "--migration-limit",
                                                                    str(migration_limit), *frontend_args])
        self.workers: dict[str, subprocess.Popen] = {}
        self.prefill_only: set[str] = set()  # workers started with --role prefill (they serve no request alone)
        self.exited: set[str] = set()  # workers `check` has reported gone
        self.logs: dict[str, Path] = {}  # each worker's output
        self.metrics_ports: dict[str, int] = {}  # of the workers started with metrics=True

    def start_frontend(self, name: str, http_port: int, args: list[str]) -> subprocess.Popen:
        """Another of Dynamo's frontends over the same workers (production runs several)."""
        self.frontends[name] = proc = self._start(name, [sys.executable, "-m", "dynamo.frontend", "--http-host",
                                                         "127.0.0.1", "--http-port", str(http_port), *args])
        return proc

    def _start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        with open(self.folder / f"{name}.log", "w") as log:  # its own session: a terminal's Ctrl-C reaches only
            return subprocess.Popen(argv, env={**self.env, **(env or {})}, stdout=log,  # the fleet, which stops it
                                    stderr=subprocess.STDOUT, start_new_session=True)

    def start_worker(self, name: str, args: list[str], timeout: float = 600, env: dict[str, str] | None = None,
                     wait: bool = True, metrics: bool = False) -> subprocess.Popen:
        """Start `meshserve worker ARGS` and wait until it has registered (or raise); `wait=False`
        for a process that never registers (process > 0 of a worker spanning several); `metrics`:
        with meshserve's metrics on a free port (read by `metric`)."""
        if metrics:
            self.metrics_ports[name] = port = free_port()
            args = [*args, "--metrics-port", str(port)]
        proc = self.workers[name] = self._start(name, [sys.executable, "-m", "meshserve.serving.cli", "worker",
                                                       "--quiet", *args], env)
        if "--role" in args and args[args.index("--role") + 1] == "prefill":
            self.prefill_only.add(name)
        log = self.logs[name] = self.folder / f"{name}.log"
        if not wait:
            return proc
        deadline = time.monotonic() + timeout
        while "meshserve worker" not in log.read_text():
            if proc.poll() is not None:
                raise MeshserveError(f"worker {name} exited with code {proc.returncode}: see {log}")
            if time.monotonic() > deadline:
                raise MeshserveError(f"worker {name} did not register within {timeout:.0f} s: see {log}")
            time.sleep(0.2)
        return proc

    def metric(self, worker: str, series: str) -> float:
        """The sum of a worker's Prometheus samples whose line starts with `series`."""
        url = f"http://127.0.0.1:{self.metrics_ports[worker]}/metrics"
        with urllib.request.urlopen(url, timeout=5) as r:
            text = r.read().decode()
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(series))

    def models(self, http_port: int | None = None) -> list[str]:
        """The models a frontend (the first, by default) lists."""
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port or self.http_port}/v1/models", timeout=5) as r:
            return [m["id"] for m in json.load(r)["data"]]

    def wait_for_model(self, name: str | None = None, http_port: int | None = None, timeout: float = 60) -> list[str]:
        """Until a frontend (the first, by default) lists model `name` (None: any model; a frontend
        still starting does not answer yet); returns what it lists. MeshserveError after `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                listed = self.models(http_port)
                if (name in listed) if name is not None else listed:
                    return listed
            except OSError:
                pass
            if time.monotonic() > deadline:
                what = f"model {name!r}" if name is not None else "a model"
                raise MeshserveError(f"no frontend listed {what} within {timeout:.0f} s: see {self.folder}")
            time.sleep(0.2)

    def check(self) -> list[str]:
        """Poll the processes once. Each worker that has exited since the last check is named on
        stderr (once) and returned; the others go on serving (Dynamo's frontend stops routing to a
        worker that left and migrates the streams it had). MeshserveError when the frontend has
        exited or no worker that serves requests (not prefill-only) is left."""
        gone = [name for name, proc in self.workers.items() if name not in self.exited and proc.poll() is not None]
        self.exited.update(gone)
        serving = [n for n, p in self.workers.items() if n not in self.exited and n not in self.prefill_only]
        for name in gone:
            print(f"meshserve fleet: {name} exited with code {self.workers[name].returncode} (its log: "
                  f"{self.logs.get(name, self.folder / (name + '.log'))}); {len(serving)} worker(s) serve on",
                  file=sys.stderr, flush=True)
        if self.frontend.poll() is not None:
            raise MeshserveError(f"the frontend exited with code {self.frontend.returncode}: see {self.folder}")
        if self.workers and not serving:
            raise MeshserveError(f"every worker has exited: see the logs in {self.folder}")
        return gone

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM every process (workers drain), SIGKILL what is left after `timeout`."""
        procs = [*self.workers.values(), *self.frontends.values()]
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def run_fleet(workers: int, router: str, port: int, worker_args: list[str], prefill_workers: int = 0,
              frontend_args: list[str] = ()) -> None:
    """Start the fleet, say where it answers, run until SIGINT or SIGTERM. With `prefill_workers`,
    disaggregated: that many `--role prefill` workers and `workers` decode workers."""
    folder = Path(tempfile.mkdtemp(prefix="meshserve-fleet-"))
    fleet = LocalFleet(folder, port, router, frontend_args=frontend_args)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    # Ctrl-C stops it as it stops `meshserve serve`, even when started with SIGINT ignored (a shell's
    # background job), where Python would otherwise leave it ignored
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        for i in range(prefill_workers):
            fleet.start_worker(f"prefill{i}", [*worker_args, "--role", "prefill", "--component", "prefill"])
        for i in range(workers):
            fleet.start_worker(f"worker{i}", [*worker_args, "--role", "decode"] if prefill_workers else worker_args)
        kind = f"{prefill_workers} prefill + {workers} decode worker(s)" if prefill_workers else f"{workers} worker(s)"
        print(f"meshserve fleet: {kind} behind Dynamo's frontend ({router} routing) at "
              f"http://127.0.0.1:{port}/v1 serving {', '.join(fleet.wait_for_model())}; logs in {folder}; "
              f"Ctrl-C stops it",
              flush=True)
        while not stop:  # a worker that exits is named, and the others serve on
            fleet.check()
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        fleet.stop()
