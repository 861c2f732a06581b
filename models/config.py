"""Model hyper-parameters: one frozen dataclass, read from YAML, a GGUF header or an HF config.json.

Every source is validated in one place (`ModelConfig.__post_init__`) so a bad file fails with a
message naming the field, before anything is compiled.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any, Mapping

import yaml

from meshserve.models.errors import ConfigError

ARCHITECTURES = ("llama", "mistral", "qwen2")

# The folder of shipped model configs (`configs/models/*.yaml`), found beside the package.
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "models"


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1's RoPE frequency scaling ("llama3" in HF's `rope_scaling`)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int

    def __post_init__(self):
        if self.factor < 1:
            raise ConfigError(f"rope_scaling.factor must be >= 1, got {self.factor}")
        if not 0 < self.low_freq_factor < self.high_freq_factor:
            raise ConfigError(
                "rope_scaling needs 0 < low_freq_factor < high_freq_factor, got "
                f"{self.low_freq_factor} and {self.high_freq_factor}")
        if self.original_max_position_embeddings <= 0:
            raise ConfigError("rope_scaling.original_max_position_embeddings must be positive")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    name: str
    architecture: str  # one of ARCHITECTURES
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    # per-frequency divisors of the inverse RoPE frequencies, as GGUF files carry Llama 3.1's scaling
    # (llama.cpp's rope_freqs.weight, [head_dim // 2]); exclusive with rope_scaling
    rope_freq_factors: tuple[float, ...] | None = None
    attention_bias: bool = False  # q/k/v projections carry a bias (Qwen2)
    tie_word_embeddings: bool = False
    sliding_window: int | None = None  # Mistral v0.1: keys older than this many positions are masked
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise ConfigError(
                f"unsupported architecture {self.architecture!r}; supported: {', '.join(ARCHITECTURES)}")
        for field in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                      "num_kv_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{field} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if not self.rms_norm_eps > 0:
            raise ConfigError(f"rms_norm_eps must be positive, got {self.rms_norm_eps}")
        if not self.rope_theta > 0:
            raise ConfigError(f"rope_theta must be positive, got {self.rope_theta}")
        if self.rope_freq_factors is not None:
            if self.rope_scaling is not None:
                raise ConfigError("rope_scaling and rope_freq_factors are two forms of one setting: give one")
            if len(self.rope_freq_factors) != self.head_dim // 2:
                raise ConfigError(f"rope_freq_factors must hold head_dim / 2 = {self.head_dim // 2} values, "
                                  f"got {len(self.rope_freq_factors)}")
            if not all(math.isfinite(f) and f > 0 for f in self.rope_freq_factors):
                raise ConfigError("rope_freq_factors must be positive finite numbers")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ConfigError(f"sliding_window must be positive or null, got {self.sliding_window}")
        for tok in ((self.bos_token_id,) if self.bos_token_id is not None else ()) + self.eos_token_ids:
            if not 0 <= tok < self.vocab_size:
                raise ConfigError(f"special token id {tok} is outside the vocabulary (size {self.vocab_size})")

    @property
    def q_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    def num_params(self) -> int:
        d, f, h, kv, hd = (self.hidden_size, self.intermediate_size, self.num_heads,
                           self.num_kv_heads, self.head_dim)
        attn = d * hd * (2 * h + 2 * kv) + (hd * (h + 2 * kv) if self.attention_bias else 0)
        layer = attn + 3 * d * f + 2 * d
        head = 0 if self.tie_word_embeddings else d * self.vocab_size
        return self.vocab_size * d + self.num_layers * layer + d + head

    # ---- (de)serialisation -------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["eos_token_ids"] = list(self.eos_token_ids)
        if self.rope_freq_factors is not None:
            out["rope_freq_factors"] = list(self.rope_freq_factors)
        else:
            del out["rope_freq_factors"]  # configs written before it existed read the same
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "config") -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown field(s) {', '.join(unknown)}")
        missing = sorted(f.name for f in dataclasses.fields(cls)
                         if f.default is dataclasses.MISSING and f.name not in data)
        if missing:
            raise ConfigError(f"{source}: missing field(s) {', '.join(missing)}")
        values = dict(data)
        if values.get("rope_scaling") is not None:
            scaling = values["rope_scaling"]
            if not isinstance(scaling, Mapping):
                raise ConfigError(f"{source}: rope_scaling must be a mapping")
            try:
                values["rope_scaling"] = RopeScaling(**scaling)
            except TypeError as e:
                raise ConfigError(f"{source}: rope_scaling: {e}") from None
        values["eos_token_ids"] = tuple(values.get("eos_token_ids") or ())
        if values.get("rope_freq_factors") is not None:
            values["rope_freq_factors"] = tuple(float(f) for f in values["rope_freq_factors"])
        return cls(**values)

    def to_yaml(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def from_yaml(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"model config {path} does not exist")
        data = yaml.safe_load(path.read_text())
        if not isinstance(data, Mapping):
            raise ConfigError(f"{path}: expected a mapping of fields")
        return cls.from_dict(data, source=str(path))

    @classmethod
    def named(cls, name: str) -> "ModelConfig":
        """A shipped config from configs/models/, e.g. `ModelConfig.named("llama3-8b")`."""
        path = CONFIG_DIR / f"{name}.yaml"
        if not path.is_file():
            shipped = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
            raise ConfigError(f"no model config named {name!r}; shipped: {', '.join(shipped)}")
        return cls.from_yaml(path)

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], name: str = "") -> "ModelConfig":
        """From a Hugging Face config.json (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM)."""
        model_type = hf.get("model_type")
        if model_type not in ARCHITECTURES:
            raise ConfigError(
                f"config.json: unsupported model_type {model_type!r}; supported: {', '.join(ARCHITECTURES)}")
        try:
            heads = int(hf["num_attention_heads"])
            hidden = int(hf["hidden_size"])
            rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
            rope_theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
            rope_type = rope.get("rope_type", rope.get("type", "default"))
            scaling = None
            if rope_type == "llama3":
                scaling = RopeScaling(
                    factor=float(rope["factor"]),
                    low_freq_factor=float(rope["low_freq_factor"]),
                    high_freq_factor=float(rope["high_freq_factor"]),
                    original_max_position_embeddings=int(rope["original_max_position_embeddings"]))
            elif rope_type not in ("default", None):
                raise ConfigError(f"config.json: unsupported rope type {rope_type!r}")
            eos = hf.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
            sliding = hf.get("sliding_window")
            if model_type == "qwen2" and not hf.get("use_sliding_window", False):
                sliding = None
            return cls(
                name=name or hf.get("_name_or_path", "") or model_type,
                architecture=model_type,
                vocab_size=int(hf["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(hf["intermediate_size"]),
                num_layers=int(hf["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(hf.get("num_key_value_heads") or heads),
                head_dim=int(hf.get("head_dim") or hidden // heads),
                max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
                rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                rope_theta=rope_theta,
                rope_scaling=scaling,
                attention_bias=bool(hf.get("attention_bias", model_type == "qwen2")),
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                sliding_window=int(sliding) if sliding else None,
                bos_token_id=hf.get("bos_token_id"),
                eos_token_ids=eos_ids,
            )
        except KeyError as e:
            raise ConfigError(f"config.json: missing field {e.args[0]!r}") from None


def rope_inv_freq(config: ModelConfig):
    """Inverse RoPE frequencies (numpy float32 [head_dim // 2]), Llama 3.1 scaling applied (as HF's
    rope_scaling, or as a GGUF file's per-frequency factors).

    Computed in float32 exactly as the reference implementations do, so logits match to 1e-5.
    """
    import numpy as np

    dim = config.head_dim
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv_freq = (1.0 / (np.float32(config.rope_theta) ** exponents)).astype(np.float32)
    if config.rope_freq_factors is not None:  # llama.cpp's form: θ_i / factor_i
        return (inv_freq / np.asarray(config.rope_freq_factors, np.float32)).astype(np.float32)
    s = config.rope_scaling
    if s is None:
        return inv_freq
    low_freq_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_freq_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths (low frequencies) are slowed by `factor`, short ones kept, and the band between
    # is interpolated smoothly.
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def read_yaml_section(path: str | os.PathLike, section: str) -> dict:
    """The `section:` mapping of a YAML config file ({} when absent); ConfigError naming the file."""
    try:
        data = yaml.safe_load(open(path)) or {}
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get(section) or {}, dict):
        raise ConfigError(f"{path}: expected a mapping with a '{section}' section")
    return data.get(section) or {}


def config_from_dict(cls, data: Any, what: str):
    """`cls(**data)` for a frozen config dataclass; ConfigError naming unknown fields or a bad value."""
    if not isinstance(data, dict):
        raise ConfigError(f"{what} must be a mapping, got {data!r}")
    unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ConfigError(f"{what}: unknown field(s) {', '.join(unknown)}")
    try:
        return cls(**data)
    except TypeError as e:
        raise ConfigError(f"{what}: {e}") from None
