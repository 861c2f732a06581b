"""What `meshserve serve MODEL` accepts: a meshserve checkpoint folder, a GGUF file or a Hugging Face
folder (config.json, safetensors, tokenizer, generation config). A GGUF file or HF folder is converted
once into the cache and found there again on later starts:

    ~/.cache/meshserve/checkpoints/<name>-<content key>-<dtype>/

The content key hashes what the source is, not where it lies: each file's name and size, its first
8 MiB (GGUF metadata, safetensors headers, the JSON files whole) and 16 pieces of 64 KiB spread over
the rest, with the converter's format. A source copied or moved elsewhere reuses its conversion; a
different file (another quantization, a fine-tune of the same shape) gets its own, without reading
the whole of a 16 GB file at every start.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

from meshserve.models.errors import ConvertError

DTYPES = ("auto", "float32", "bfloat16")
HEAD_BYTES = 8 << 20
PIECES, PIECE_BYTES = 16, 64 << 10
# Changes when a conversion of the same source would come out differently (new fields kept).
CONVERTER = "meshserve-convert-2"


def content_key(files: list[Path]) -> str:
    """16 hex digits naming the files' contents (see the module's docstring)."""
    h = hashlib.blake2b(CONVERTER.encode(), digest_size=8)
    for path in sorted(files, key=lambda p: p.name):
        size = path.stat().st_size
        h.update(f"{path.name}\0{size}\0".encode())
        with path.open("rb") as f:
            h.update(f.read(HEAD_BYTES))
            if size > HEAD_BYTES:
                step = (size - HEAD_BYTES) // PIECES
                for i in range(PIECES):
                    f.seek(HEAD_BYTES + i * step)
                    h.update(f.read(PIECE_BYTES))
    return h.hexdigest()


def _kind(path: Path) -> str:
    """checkpoint | gguf | hf; ConvertError for anything else."""
    from meshserve.models.checkpoint import META_FILE

    if not path.exists():
        raise ConvertError(f"model {path} does not exist (give a GGUF file, a Hugging Face folder or a "
                           f"meshserve checkpoint)")
    if path.is_dir() and (path / META_FILE).is_file():
        return "checkpoint"
    if path.is_file():
        with path.open("rb") as f:
            if f.read(4) == b"GGUF":
                return "gguf"
        raise ConvertError(f"model {path} is not a GGUF file (no GGUF magic); give a GGUF file, a Hugging Face "
                           f"folder or a meshserve checkpoint")
    if (path / "config.json").is_file():
        return "hf"
    raise ConvertError(f"model {path} is a folder with neither config.json (a Hugging Face model) nor "
                       f"{META_FILE} (a meshserve checkpoint)")


def source_dtype(kind: str, path: Path) -> str:
    """What `--dtype auto` converts to: bfloat16 for a bfloat16 or float16 source (meshserve holds
    float32 or bfloat16) and for quantized GGUF blocks, float32 for a float32 source."""
    if kind == "hf":
        try:
            config = json.loads((path / "config.json").read_text())
        except ValueError as e:
            raise ConvertError(f"{path / 'config.json'} is not valid JSON: {e}") from None
        declared = config.get("dtype") or config.get("torch_dtype") or "float32"
        return "float32" if declared == "float32" else "bfloat16"
    from gguf import GGMLQuantizationType as Q, GGUFReader

    types = {t.tensor_type for t in GGUFReader(path, "r").tensors if len(t.shape) > 1}  # weights, not norms
    return "float32" if types <= {Q.F32} else "bfloat16"


def source_name(spec: str | None) -> str | None:
    """The name a GGUF file or HF folder is served under (the file's stem, the folder's name), as the
    user gave it rather than its cached conversion's; None for a checkpoint (its folder names it)."""
    if spec is None:
        return None
    path = Path(spec).expanduser()
    if path.is_file():
        return path.stem
    if path.is_dir() and (path / "config.json").is_file():
        return path.name
    return None


def resolve_model(spec: str | None, dtype: str = "auto", progress: bool = True,
                  quantization: str | None = None) -> Path:
    """The checkpoint folder to serve for `spec` (None: the default model), converting a GGUF file or
    HF folder into the cache the first time; `quantization`: with the linear layers' weights in that
    format (models/quant.py), converted so once too."""
    from meshserve.models.default import cache_dir, default_checkpoint, default_gguf
    from meshserve.models.config import QUANTIZATIONS

    if dtype not in DTYPES:
        raise ConvertError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if quantization is not None and quantization not in QUANTIZATIONS:
        raise ConvertError(f"--quantization must be one of {', '.join(QUANTIZATIONS)}, got {quantization!r}")
    if spec is None:
        if quantization is None:
            return default_checkpoint(dtype="float32" if dtype == "auto" else dtype, progress=progress)
        spec, dtype = str(default_gguf()), "float32" if dtype == "auto" else dtype
    path = Path(spec).expanduser().absolute()
    kind = _kind(path)
    if kind == "checkpoint":
        from meshserve.models.checkpoint import read_meta

        _, config, held = read_meta(path)
        if dtype != "auto" and held.name != dtype:
            raise ConvertError(f"checkpoint {path} holds {held.name}, not {dtype}: convert its source again with "
                               f"--dtype {dtype}")
        if quantization is not None and config.quantization != quantization:
            raise ConvertError(f"checkpoint {path} holds {config.quantization or 'float'} weights, not "
                               f"{quantization}: convert its source again with --quantize {quantization}")
        return path
    if dtype == "auto":
        dtype = source_dtype(kind, path)
    files = [path] if kind == "gguf" else sorted(p for p in path.iterdir() if p.is_file() and (
        p.suffix in (".safetensors", ".json", ".jinja")))
    name = path.stem if kind == "gguf" else path.name
    suffix = f"-{quantization}" if quantization else ""
    out = cache_dir() / "checkpoints" / f"{name}-{content_key(files)}-{dtype}{suffix}"
    say = (lambda line: print(f"meshserve: {line}", file=sys.stderr, flush=True)) if progress else (lambda line: None)
    if out.is_dir():
        say(f"model {path.name}: converted before, at {out}")
        return out
    from meshserve.models.convert import convert_into_cache

    say(f"model {path.name}: converting ({kind}) to {dtype}{' with ' + quantization + ' weights' if quantization else ''} "
        f"into {out} (once; later starts reuse it)")
    return convert_into_cache(f"{kind}:{path}", out, dtype, progress, quantize=quantization)
