"""The versions of what meshserve runs on, for logs and bug reports (`meshserve --version`, the test
suite's summary, the GPU suite's log). Read from installed metadata: nothing is imported."""

from __future__ import annotations

import importlib.metadata
import platform

# What a run's numbers and outputs depend on; the ones not installed are left out.
STACK = ("jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda13-plugin", "flax", "orbax-checkpoint", "tensorstore",
         "numpy", "grpcio", "tokenizers", "transformers", "torch", "ai-dynamo", "ai-dynamo-runtime")


def versions(names: tuple[str, ...] = STACK) -> dict[str, str]:
    found = {"meshserve": _version("meshserve") or "source tree", "python": platform.python_version()}
    for name in names:
        version = _version(name)
        if version is not None:
            found[name] = version
    return found


def describe(names: tuple[str, ...] = STACK) -> str:
    """One line: `meshserve 0.1.0, python 3.11.7, jax 0.10.2, …`."""
    return ", ".join(f"{name} {version}" for name, version in versions(names).items())


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None
