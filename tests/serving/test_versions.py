import importlib.metadata
import subprocess
import sys

from meshserve.serving.versions import describe, versions


def test_the_stack_is_read_from_installed_metadata():
    found = versions()
    for name in ("jax", "jaxlib", "flax", "transformers", "torch"):
        assert found[name] == importlib.metadata.version(name)
    assert found["python"] == ".".join(map(str, sys.version_info[:3]))
    assert "jax-cuda13-plugin" not in found  # not installed here: left out, not "unknown"
    assert versions(("no-such-distribution",)).keys() == {"meshserve", "python"}


def test_meshserve_version_prints_one_line():
    out = subprocess.run([sys.executable, "-m", "meshserve.serving.cli", "--version"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and out.stdout == describe() + "\n"
    assert out.stdout.startswith("meshserve 0.1.0, python ") and "jax " + versions()["jax"] in out.stdout
