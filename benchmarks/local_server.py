"""`meshserve serve` started by a benchmark: the shipped config with some engine fields changed, on
loopback ports, returned once its HTTP /health answers 200."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def start_server(model: str, port: int, http_port: int, folder: Path, engine: dict,
                 timeout_s: float = 600) -> subprocess.Popen:
    import yaml

    config = yaml.safe_load((ROOT / "configs/serving/default.yaml").read_text())
    config["engine"].update(engine)
    config["server"].update(port=port, http_port=http_port, metrics_port=None, model=model)
    path = folder / "serving.yaml"
    path.write_text(yaml.safe_dump(config))
    server = subprocess.Popen([sys.executable, "-m", "meshserve.serving.cli", "serve", "--config", str(path),
                               "--quiet"], cwd=ROOT)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{http_port}/health", timeout=2).status == 200:
                return server
        except OSError:
            pass
        if server.poll() is not None:
            raise SystemExit(f"the server exited with {server.returncode}")
        time.sleep(1)
    server.kill()
    raise SystemExit(f"the server was not ready within {timeout_s:.0f} s")
