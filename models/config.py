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

# Dense families, then the mixture-of-experts ones (models/moe.py).
ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "mixtral")
MOE_ARCHITECTURES = ("qwen2_moe", "qwen3_moe", "mixtral")
# The transformers class of each, as a Hugging Face config.json names it.
HF_CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
              "qwen3": "Qwen3ForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
              "mixtral": "MixtralForCausalLM"}

# The linear layers' weight formats of models/quant.py (named here so reading a config needs no jax).
QUANTIZATIONS = ("int8", "w8a8", "fp8", "fp8-block", "w8a8-fp8", "int4-g32", "int4-g128", "q8_0", "q4_1",
                 "int8-g16")
# what engine.kv_cache_dtype may name (runtime/kv_quant.py; here so the CLI lists them without jax)
KV_CACHE_DTYPES = ("auto", "float32", "bfloat16", "int8", "fp8", "fp8_e4m3")

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
    qk_norm: bool = False  # an RMSNorm over head_dim on each q and k head before RoPE (Qwen3)
    tie_word_embeddings: bool = False
    sliding_window: int | None = None  # Mistral v0.1: keys older than this many positions are masked
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # Mixture of experts (0 experts: a dense model). Each token's router picks `num_experts_per_tok`
    # experts by softmax probability; `norm_topk_prob` renormalises the picked probabilities to sum to 1.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0  # each expert's MLP width
    norm_topk_prob: bool = True
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE: one always-on expert, scaled by a sigmoid gate
    dense_layers: tuple[int, ...] = ()  # layers with a plain MLP (of `intermediate_size`) in an MoE model
    # The linear layers' weights in a quantized format of models/quant.py ("int8", "fp8", "int4-g32", …);
    # None: float, in the checkpoint's dtype. Embeddings, the vocabulary head, norms and routers stay float.
    quantization: str | None = None

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
        self._check_moe()
        if self.quantization is not None and self.quantization not in QUANTIZATIONS:
            raise ConfigError(f"quantization must be one of {', '.join(QUANTIZATIONS)} or null, "
                              f"got {self.quantization!r}")
        for tok in ((self.bos_token_id,) if self.bos_token_id is not None else ()) + self.eos_token_ids:
            if not 0 <= tok < self.vocab_size:
                raise ConfigError(f"special token id {tok} is outside the vocabulary (size {self.vocab_size})")

    def _check_moe(self) -> None:
        moe = self.architecture in MOE_ARCHITECTURES
        if not moe:
            if self.num_experts or self.num_experts_per_tok or self.shared_expert_intermediate_size:
                raise ConfigError(f"architecture {self.architecture!r} has no experts: num_experts, "
                                  "num_experts_per_tok and shared_expert_intermediate_size must be 0")
            return
        for field in ("num_experts", "num_experts_per_tok", "moe_intermediate_size"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{field} must be a positive integer for {self.architecture}, got {value!r}")
        if self.num_experts_per_tok > self.num_experts:
            raise ConfigError(f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds num_experts "
                              f"({self.num_experts})")
        if self.shared_expert_intermediate_size < 0:
            raise ConfigError("shared_expert_intermediate_size must be >= 0")
        bad = [i for i in self.dense_layers if not 0 <= i < self.num_layers]
        if bad:
            raise ConfigError(f"dense_layers {bad} are outside the model's {self.num_layers} layers")

    @property
    def q_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    def is_moe_layer(self, layer: int) -> bool:
        return self.num_experts > 0 and layer not in self.dense_layers

    def num_params(self, active: bool = False) -> int:
        """Parameters in all; `active`: those one token uses (its top-k experts, not all of them)."""
        d, f, h, kv, hd = (self.hidden_size, self.intermediate_size, self.num_heads,
                           self.num_kv_heads, self.head_dim)
        attn = d * hd * (2 * h + 2 * kv) + (hd * (h + 2 * kv) if self.attention_bias else 0)
        attn += 2 * hd if self.qk_norm else 0
        experts = self.num_experts_per_tok if active else self.num_experts
        moe = (d * self.num_experts + experts * 3 * d * self.moe_intermediate_size
               + (3 * d * self.shared_expert_intermediate_size + d if self.shared_expert_intermediate_size else 0))
        mlps = sum(moe if self.is_moe_layer(i) else 3 * d * f for i in range(self.num_layers))
        head = 0 if self.tie_word_embeddings else d * self.vocab_size
        return self.vocab_size * d + self.num_layers * (attn + 2 * d) + mlps + d + head

    # ---- (de)serialisation -------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["eos_token_ids"] = list(self.eos_token_ids)
        out["dense_layers"] = list(self.dense_layers)
        if self.num_experts == 0:  # a dense model's file reads as it did before experts existed
            for field in _MOE_FIELDS:
                del out[field]
        if not self.qk_norm:
            del out["qk_norm"]
        if self.quantization is None:
            del out["quantization"]
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
        values["dense_layers"] = tuple(values.get("dense_layers") or ())
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
        """From a Hugging Face config.json: Llama, Mistral, Qwen2, Qwen3, Qwen2-MoE, Qwen3-MoE, Mixtral."""
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
            if model_type.startswith("qwen") and not hf.get("use_sliding_window", False):
                sliding = None
            moe = {}
            if model_type in MOE_ARCHITECTURES:
                experts = int(hf.get("num_experts") or hf["num_local_experts"])  # the names vary by version
                step = int(hf.get("decoder_sparse_step") or 1)
                only = set(hf.get("mlp_only_layers") or ())
                layers = int(hf["num_hidden_layers"])
                moe = dict(
                    num_experts=experts, num_experts_per_tok=int(hf["num_experts_per_tok"]),
                    moe_intermediate_size=int(hf["intermediate_size"] if model_type == "mixtral"
                                              else hf["moe_intermediate_size"]),
                    # Mixtral always renormalises; the Qwen MoE configs say so (transformers' default: no)
                    norm_topk_prob=True if model_type == "mixtral" else bool(hf.get("norm_topk_prob", False)),
                    shared_expert_intermediate_size=int(hf.get("shared_expert_intermediate_size") or 0),
                    dense_layers=tuple(i for i in range(layers) if i in only or (i + 1) % step))
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
                attention_bias=bool(hf.get("attention_bias", hf.get("qkv_bias", model_type in ("qwen2", "qwen2_moe")))),
                qk_norm=model_type in ("qwen3", "qwen3_moe"),
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                sliding_window=int(sliding) if sliding else None,
                bos_token_id=hf.get("bos_token_id"),
                eos_token_ids=eos_ids,
                **moe,
            )
        except KeyError as e:
            raise ConfigError(f"config.json: missing field {e.args[0]!r}") from None


_MOE_FIELDS = ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob",
               "shared_expert_intermediate_size", "dense_layers")


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
