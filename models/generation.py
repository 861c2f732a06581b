"""A model's sampling defaults: what a request that names no temperature (or top_p, top_k, min_p,
repetition_penalty) is sampled with.

They come from the model's `generation_config.json` as transformers reads it: `do_sample` false (its
default) is greedy, true samples with the file's temperature, top_p, top_k… (only the fields it sets,
as vLLM takes them). A GGUF file carries them as `general.sampling.*`; where it has none, the family's
published generation config stands in (`FAMILY_DEFAULTS`, by `general.basename`). A checkpoint keeps
them in its own `generation_config.json`.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping

from meshserve.models.errors import ConvertError

FILE = "generation_config.json"
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")

# GGUF's general.sampling.* keys (llama.cpp) → SamplingParams fields.
GGUF_KEYS = {"general.sampling.temp": "temperature", "general.sampling.top_p": "top_p",
             "general.sampling.top_k": "top_k", "general.sampling.min_p": "min_p",
             "general.sampling.penalty_repeat": "repetition_penalty"}

# The families' published generation_config.json, for GGUF files that carry no sampling keys.
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    # SmolLM2-Instruct's file sets no do_sample: transformers decodes it greedily. (At the model
    # card's temperature 0.2 / top_p 0.9 the 135M Q4_1 model names Paris as France's capital 43
    # times in 64: its first token is nearly a coin toss.)
    "smollm2": {"temperature": 0.0},
    "llama-3": {"temperature": 0.6, "top_p": 0.9},
    "llama-3.1": {"temperature": 0.6, "top_p": 0.9},
    "llama-3.2": {"temperature": 0.6, "top_p": 0.9},
    "qwen2": {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05},
    "qwen2.5": {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05},
}


def check(defaults: Mapping[str, Any], where: str, error: type[Exception] = ConvertError) -> dict[str, Any]:
    """Only sampling fields, each a finite number (top_k an integer); `error` naming `where`."""
    out: dict[str, Any] = {}
    for name, value in defaults.items():
        if name not in SAMPLING_FIELDS:
            raise error(f"{where}: {name!r} is not a sampling default; known: {', '.join(SAMPLING_FIELDS)}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise error(f"{where}: {name} must be a finite number, got {value!r}")
        if name == "top_k":
            if int(value) != value:
                raise error(f"{where}: top_k must be an integer, got {value!r}")
            value = max(0, int(value))  # -1 and 0 both mean off
        out[name] = float(value) if name != "top_k" else value
    return out


def from_hf(config: Mapping[str, Any], where: str = FILE) -> dict[str, Any]:
    """The sampling defaults a Hugging Face generation_config.json stands for."""
    if not config.get("do_sample", False):
        out = {"temperature": 0.0}  # transformers: greedy
        if config.get("repetition_penalty") is not None:
            out["repetition_penalty"] = config["repetition_penalty"]
        return check(out, where)
    return check({k: config[k] for k in SAMPLING_FIELDS if config.get(k) is not None}, where)


def read_hf_folder(folder: Path) -> dict[str, Any]:
    """The folder's generation_config.json as sampling defaults ({} without one)."""
    path = folder / FILE
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text())
    except ValueError as e:
        raise ConvertError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise ConvertError(f"{path} must hold a JSON object")
    return from_hf(config, str(path))


def from_gguf(fields: Mapping[str, Any], basename: str | None, where: str) -> dict[str, Any]:
    """A GGUF file's `general.sampling.*` values, else its family's published defaults ({} if unknown)."""
    given = {GGUF_KEYS[k]: v for k, v in fields.items() if k in GGUF_KEYS and v is not None}
    if given:
        return check(given, where)
    return dict(FAMILY_DEFAULTS.get((basename or "").lower(), {}))


def save(folder: Path, defaults: Mapping[str, Any]) -> None:
    """Written in HF's shape, so transformers reads the same defaults from the checkpoint (no file
    for no defaults)."""
    if not defaults:
        return
    greedy = defaults.get("temperature") == 0.0
    body = {"do_sample": not greedy, **{k: v for k, v in defaults.items() if not (greedy and k == "temperature")}}
    tmp = folder / f".{FILE}.partial-{os.getpid()}"
    tmp.write_text(json.dumps(body, indent=1) + "\n")
    os.replace(tmp, folder / FILE)  # whole or not at all


def load(folder: Path) -> dict[str, Any]:
    """A checkpoint's sampling defaults ({} when it has none)."""
    return read_hf_folder(folder)
