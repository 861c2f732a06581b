"""The `server:` section of serving config files."""

import subprocess
import sys
from pathlib import Path

import pytest

from meshserve.models.errors import ConfigError
from meshserve.serving.config import ServerConfig

ROOT = Path(__file__).resolve().parents[2]


def test_shipped_config_loads_and_flags_override():
    config = ServerConfig.from_yaml(ROOT / "configs/serving/default.yaml")
    assert (config.host, config.port, config.metrics_port, config.auth_tokens) == ("127.0.0.1", 50051, 9464, ())
    assert config.override(port=8000, mesh=None).port == 8000


def test_tokens_from_the_environment(monkeypatch):
    monkeypatch.setenv("MESHSERVE_TEST_TOKENS", "a, b")
    assert ServerConfig.from_dict({"auth_tokens": ["env:MESHSERVE_TEST_TOKENS", "c"]}).auth_tokens == ("a", "b", "c")
    monkeypatch.delenv("MESHSERVE_TEST_TOKENS")
    with pytest.raises(ConfigError, match="MESHSERVE_TEST_TOKENS is not set"):
        ServerConfig.from_dict({"auth_tokens": "env:MESHSERVE_TEST_TOKENS"})


@pytest.mark.parametrize("data,message", [
    ({"prot": 1}, "unknown field"),
    ({"port": 70000}, "server.port"),
    ({"metrics_port": -1}, "metrics_port"),
    ({"tls_cert": "c.pem"}, "tls_cert and server.tls_key go together"),
    ({"max_message_bytes": 10}, "max_message_bytes"),
    ({"drain_timeout_s": -1}, "drain_timeout_s"),
])
def test_bad_server_config(data, message):
    with pytest.raises(ConfigError, match=message):
        ServerConfig.from_dict(data)


def test_serve_with_a_bad_config_is_one_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("server:\n  port: 70000\n")
    proc = subprocess.run([sys.executable, "-m", "meshserve.serving.cli", "serve", "--config", str(path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == ["meshserve: error: server.port must be in [0, 65536) or null, got 70000"]
