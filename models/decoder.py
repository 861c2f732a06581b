"""The decoder of every supported family as Flax NNX modules and one pure forward.

    forward(params, tokens, positions, cache=None, *, config, logits_at=None, experts=ExpertPlan())
        -> (logits, cache)

One decoder, composed from the config: attention (with q/k/v biases for Qwen2, a q/k RMSNorm for
Qwen3, a sliding window for Mistral), then per layer a SwiGLU MLP or a mixture of experts
(models/moe.py; a shared expert for Qwen2-MoE). Llama 2/3/3.1, Mistral, Qwen2 and Qwen3 are dense;
Qwen2-MoE, Qwen3-MoE and Mixtral mix experts.

`params` is a plain nested dict of arrays (what the Orbax checkpoint holds); the NNX modules only give
it structure, initialisation and logical axis names. Every parameter carries `axes`, the logical axis
names that sharding/rules.py maps onto a device mesh. Layers are a Python list, unrolled when traced:
no `lax.scan` over stacked weights (see DESIGN.md, decision 2).

Shapes: B batch, T new tokens, S cache slots, D hidden, H q heads, K kv heads, G = H // K, E head_dim,
F mlp, V vocab, X experts.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float, Int

from meshserve.models import moe, quant
from meshserve.models.config import ModelConfig, rope_inv_freq
from meshserve.models.moe import ExpertPlan

Params = dict[str, Any]  # nested dict of arrays, the pure form of `nnx.State` (see `abstract_params`)

_INIT_STD = 0.02
_MASKED = -1e30  # finite, so a fully masked (padding) row gives zeros rather than NaN


# ---- modules ------------------------------------------------------------------------------------

def _param(rngs: nnx.Rngs | None, shape, dtype, axes, init: str = "normal") -> nnx.Param:
    if init == "ones":
        value = jnp.ones(shape, dtype)
    elif init == "zeros":
        value = jnp.zeros(shape, dtype)
    else:
        value = (_INIT_STD * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    return nnx.Param(value, axes=axes)


class QuantizedWeight(nnx.Module):
    """A linear layer's weight in a quantized format (models/quant.py): the values `q`, their `scale`
    (and `zero`), each with the weight's logical axes, so they shard with it."""

    def __init__(self, rngs: nnx.Rngs, shape, axes, geometry: quant.Geometry):
        self.geometry = geometry
        w = _INIT_STD * jax.random.normal(rngs.params(), shape, jnp.float32)
        for name, value in quant.quantize(w, geometry).items():
            setattr(self, name, nnx.Param(value, axes=axes))

    def parts(self) -> dict[str, Array]:
        return {name: getattr(self, name)[...] for name in ("q", "scale", "zero") if hasattr(self, name)}

    def dequantized(self, dtype) -> Array:
        return quant.dequantize(self.parts(), self.geometry, dtype)


def _weight(rngs: nnx.Rngs, shape, dtype, axes, c: ModelConfig, batch: int = 0, contract: int = 1):
    """A linear layer's weight: float, or quantized when the config says so."""
    if c.quantization is None:
        return _param(rngs, shape, dtype, axes)
    return QuantizedWeight(rngs, shape, axes, quant.Geometry(tuple(shape), batch, contract,
                                                             quant.get_format(c.quantization)))


def _matmul(x: Float[Array, "... k"], w) -> Float[Array, "... n"]:
    """x times a weight whose leading axes are its inputs (flattened to x's last): [..., N] with the
    weight's output axes flattened. A plain 2-D matmul over free reshapes: XLA:CPU otherwise copies
    [D, H, E] weights per call."""
    if isinstance(w, QuantizedWeight):
        return quant.dot(x, w.parts(), w.geometry)
    w = w[...]
    K = x.shape[-1]
    return x @ w.reshape(K, w.size // K)


def _experts_weight(w, dtype) -> Array:
    """An MoE's stacked expert weights as floats (quantized ones dequantized inside the program)."""
    return w.dequantized(dtype) if isinstance(w, QuantizedWeight) else w[...]


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, dtype, axis: str = "embed"):
        self.weight = _param(None, (dim,), dtype, (axis,), init="ones")
        self.eps = eps

    def __call__(self, x: Float[Array, "... d"]) -> Float[Array, "... d"]:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * x32.astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, c: ModelConfig, *, dtype, rngs: nnx.Rngs):
        D, H, K, E = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
        self.q_proj = _weight(rngs, (D, H, E), dtype, ("embed", "q_heads", "head_dim"), c)
        self.k_proj = _weight(rngs, (D, K, E), dtype, ("embed", "kv_heads", "head_dim"), c)
        self.v_proj = _weight(rngs, (D, K, E), dtype, ("embed", "kv_heads", "head_dim"), c)
        self.o_proj = _weight(rngs, (H, E, D), dtype, ("q_heads", "head_dim", "embed"), c, contract=2)
        if c.attention_bias:
            self.q_bias = _param(rngs, (H, E), dtype, ("q_heads", "head_dim"))
            self.k_bias = _param(rngs, (K, E), dtype, ("kv_heads", "head_dim"))
            self.v_bias = _param(rngs, (K, E), dtype, ("kv_heads", "head_dim"))
        if c.qk_norm:
            self.q_norm = RMSNorm(E, c.rms_norm_eps, dtype=dtype, axis="head_dim")
            self.k_norm = RMSNorm(E, c.rms_norm_eps, dtype=dtype, axis="head_dim")
        self.sliding_window, self.head_dim = c.sliding_window, E

    def __call__(self, x: Float[Array, "b t d"], rope: tuple[Array, Array],
                 positions: Int[Array, "b t"], cache: "KVCache | None", layer: int):
        B, T, _ = x.shape
        q = _matmul(x, self.q_proj).reshape(B, T, -1, self.head_dim)  # [B, T, H, E]
        k = _matmul(x, self.k_proj).reshape(B, T, -1, self.head_dim)  # [B, T, K, E]
        v = _matmul(x, self.v_proj).reshape(B, T, -1, self.head_dim)
        if hasattr(self, "q_bias"):
            q, k, v = q + self.q_bias[...], k + self.k_bias[...], v + self.v_bias[...]
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is None:  # no cache: attend within this call
            out = attention(q, k, v, positions, positions, self.sliding_window)
        else:
            out, cache = cache.attend(layer, q, k, v, positions, self.sliding_window)
        return _matmul(out.reshape(B, T, -1), self.o_proj), cache


class MLP(nnx.Module):
    def __init__(self, c: ModelConfig, *, dtype, rngs: nnx.Rngs, width: int | None = None):
        D, F = c.hidden_size, width or c.intermediate_size
        self.gate_proj = _weight(rngs, (D, F), dtype, ("embed", "mlp"), c)
        self.up_proj = _weight(rngs, (D, F), dtype, ("embed", "mlp"), c)
        self.down_proj = _weight(rngs, (F, D), dtype, ("mlp", "embed"), c)

    def __call__(self, x: Float[Array, "b t d"], experts: ExpertPlan | None = None):
        """The output, and (as an MoE block's) the experts each token picked: none here."""
        gate = jax.nn.silu(_matmul(x, self.gate_proj))
        return _matmul(gate * _matmul(x, self.up_proj), self.down_proj), None


class MoE(nnx.Module):
    """A router, X SwiGLU experts stacked on a leading `expert` axis, and (Qwen2-MoE) a shared expert
    every token passes through, scaled by a sigmoid gate."""

    def __init__(self, c: ModelConfig, *, dtype, rngs: nnx.Rngs):
        D, F, X = c.hidden_size, c.moe_intermediate_size, c.num_experts
        self.router = _param(rngs, (D, X), dtype, ("embed", "router"))
        self.gate_proj = _weight(rngs, (X, D, F), dtype, ("expert", "embed", "mlp"), c, batch=1)
        self.up_proj = _weight(rngs, (X, D, F), dtype, ("expert", "embed", "mlp"), c, batch=1)
        self.down_proj = _weight(rngs, (X, F, D), dtype, ("expert", "mlp", "embed"), c, batch=1)
        if c.shared_expert_intermediate_size:
            self.shared = MLP(c, dtype=dtype, rngs=rngs, width=c.shared_expert_intermediate_size)
            self.shared_gate = _param(rngs, (D, 1), dtype, ("embed", "router"))
        self.top_k, self.normalize = c.num_experts_per_tok, c.norm_topk_prob

    def __call__(self, x: Float[Array, "b t d"], experts: ExpertPlan) -> tuple[Array, Int[Array, "bt k"]]:
        """The output, and the experts each token picked."""
        flat = x.reshape(-1, x.shape[-1])  # [B * T, D]
        ids, weights = moe.route(flat, self.router[...], self.top_k, self.normalize)
        # quantized experts: dequantized whole in the program, weight only (a grouped quantized matmul
        # that reads only the experts picked is not built yet)
        gate, up, down = (_experts_weight(w, x.dtype) for w in (self.gate_proj, self.up_proj, self.down_proj))
        out = moe.experts_mlp(flat, ids, weights, gate, up, down, experts)
        if hasattr(self, "shared"):
            out = out + jax.nn.sigmoid(flat @ self.shared_gate[...]) * self.shared(flat)[0]
        return out.reshape(x.shape), ids


class DecoderLayer(nnx.Module):
    def __init__(self, c: ModelConfig, layer: int, *, dtype, rngs: nnx.Rngs):
        self.input_norm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype=dtype)
        self.attn = Attention(c, dtype=dtype, rngs=rngs)
        self.post_attn_norm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype=dtype)
        self.mlp = MoE(c, dtype=dtype, rngs=rngs) if c.is_moe_layer(layer) else MLP(c, dtype=dtype, rngs=rngs)

    def __call__(self, x, rope, positions, cache, layer: int, experts: ExpertPlan):
        h, cache = self.attn(self.input_norm(x), rope, positions, cache, layer)
        x = x + h
        h, picked = self.mlp(self.post_attn_norm(x), experts)
        return x + h, cache, picked


class Decoder(nnx.Module):
    def __init__(self, c: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = c
        V, D = c.vocab_size, c.hidden_size
        if c.quantization and quant.get_format(c.quantization).activations:
            # the speed formats quantize the vocabulary too (at batch 1 its head is a fifth of a small
            # model's bytes): a scale per vocabulary row, read by the lookup and by the tied head
            self.embed = QuantizedWeight(rngs, (V, D), ("vocab", "embed"),
                                         quant.Geometry((V, D), 1, 1, quant.get_format(c.quantization)))
        else:
            self.embed = _param(rngs, (V, D), dtype, ("vocab", "embed"))
        self.layers = nnx.List([DecoderLayer(c, i, dtype=dtype, rngs=rngs) for i in range(c.num_layers)])
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype=dtype)
        if not c.tie_word_embeddings:
            self.lm_head = (_weight(rngs, (D, V), dtype, ("embed", "vocab"), c) if isinstance(self.embed, QuantizedWeight)
                            else _param(rngs, (D, V), dtype, ("embed", "vocab")))

    def __call__(self, tokens: Int[Array, "b t"], positions: Int[Array, "b t"],
                 cache: "KVCache | None" = None, logits_at: Int[Array, "b"] | None = None,
                 experts: ExpertPlan = ExpertPlan()):
        x, cache, _ = self.hidden(tokens, positions, cache, experts)
        if logits_at is not None:  # only these tokens' logits: the vocabulary head is costly
            x = x[jnp.arange(x.shape[0]), logits_at][:, None]  # [B, 1, D]
        return self.head(x), cache

    def hidden(self, tokens: Int[Array, "b t"], positions: Int[Array, "b t"], cache: "KVCache | None" = None,
               experts: ExpertPlan = ExpertPlan(), valid: Array | None = None):
        """The last layer's output, normed: f32-or-params-dtype[B, T, D] (the head's input); the cache;
        and the router's statistics: i32[MoE layers, X], how many of the `valid` tokens (all when
        None) each layer sent to each expert (i32[0, 0] for a dense model)."""
        x = self.embedding(tokens)  # [B, T, D]
        rope = rope_tables(self.config, positions)
        valid = jnp.ones(tokens.shape, bool) if valid is None else valid
        routing = []
        for i, layer in enumerate(self.layers):
            x, cache, picked = layer(x, rope, positions, cache, i, experts)
            if picked is not None:
                routing.append(moe.tokens_per_expert(picked, valid.reshape(-1), self.config.num_experts))
        routing = jnp.stack(routing) if routing else jnp.zeros((0, 0), jnp.int32)
        return self.norm(x), cache, routing

    def embedding(self, tokens: Int[Array, "b t"]) -> Float[Array, "b t d"]:
        if not isinstance(self.embed, QuantizedWeight):
            return jnp.take(self.embed[...], tokens, axis=0)
        rows = jnp.take(self.embed.q[...], tokens, axis=0).astype(jnp.float32)
        return (rows * jnp.take(self.embed.scale[...], tokens, axis=0)).astype(self.norm.weight[...].dtype)

    def head(self, x: Float[Array, "b t d"]) -> Float[Array, "b t v"]:
        if isinstance(self.embed, QuantizedWeight):  # the speed formats: one low-precision matmul
            if self.config.tie_word_embeddings:
                w = self.embed
                return quant.dot_transposed(x, w.q[...], w.scale[...], w.geometry.format)
            return _matmul(x, self.lm_head).astype(jnp.float32)
        if self.config.tie_word_embeddings:  # contract with embed [V, D] as stored: no transposed copy
            return jnp.einsum("btd,vd->btv", x, self.embed[...], preferred_element_type=jnp.float32)
        return jnp.einsum("btd,dv->btv", x, self.lm_head[...], preferred_element_type=jnp.float32)


class KVCache(Protocol):
    """What the decoder needs of a KV cache; models/ knows no more of pages than this.

    `attend` stores this layer's new keys and values at their positions, attends each query to every
    cached key at a position <= its own, and returns the output with the updated cache.
    """

    def attend(self, layer: int, q: Float[Array, "b t h e"], k: Float[Array, "b t k e"],
               v: Float[Array, "b t k e"], positions: Int[Array, "b t"],
               sliding_window: int | None) -> tuple[Float[Array, "b t h e"], "KVCache"]: ...


# ---- pure functions -----------------------------------------------------------------------------

def rope_tables(c: ModelConfig, positions: Int[Array, "b t"]) -> tuple[Array, Array]:
    """cos and sin, f32[B, T, E // 2], for the rotate-half RoPE layout used by HF checkpoints."""
    inv_freq = jnp.asarray(rope_inv_freq(c))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: Float[Array, "b t h e"], cos: Array, sin: Array) -> Float[Array, "b t h e"]:
    # Pairs are (x[i], x[i + E/2]) — the "rotate half" layout; GGUF's interleaved layout is undone
    # by the importer when it un-permutes Q and K.
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def attention(q: Float[Array, "b t h e"], k: Float[Array, "b s k e"], v: Float[Array, "b s k e"],
              q_pos: Int[Array, "b t"], k_pos: Int[Array, "b s"],
              sliding_window: int | None = None) -> Float[Array, "b t h e"]:
    """Reference causal GQA attention by positions, float32 softmax: key s is seen by query t iff
    k_pos[s] <= q_pos[t] (and, with a sliding window, k_pos[s] > q_pos[t] - window)."""
    B, T, H, E = q.shape
    K = k.shape[2]
    qg = q.reshape(B, T, K, H // K, E)
    scores = jnp.einsum("btkge,bske->bkgts", qg, k, preferred_element_type=jnp.float32)
    scores = scores * (E ** -0.5)
    visible = k_pos[:, None, :] <= q_pos[:, :, None]  # [B, T, S]
    if sliding_window is not None:
        visible &= k_pos[:, None, :] > q_pos[:, :, None] - sliding_window
    scores = jnp.where(visible[:, None, None], scores, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bkgts,bske->btkge", probs.astype(v.dtype), v)
    return out.reshape(B, T, H, E)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DenseKVCache:
    """A contiguous cache: per layer (keys, values), each [B, S, K, E]; slot s holds position s.

    The simple cache for one-off use and tests; runtime/kv_cache.py holds the paged one.
    """

    layers: tuple[tuple[Array, Array], ...]

    @classmethod
    def zeros(cls, c: ModelConfig, batch: int, slots: int, dtype=jnp.float32) -> "DenseKVCache":
        shape = (batch, slots, c.num_kv_heads, c.head_dim)
        return cls(tuple((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
                         for _ in range(c.num_layers)))

    def attend(self, layer, q, k, v, positions, sliding_window):
        keys, values = self.layers[layer]
        batch = jnp.arange(q.shape[0])[:, None]
        keys = keys.at[batch, positions].set(k.astype(keys.dtype))
        values = values.at[batch, positions].set(v.astype(values.dtype))
        key_pos = jnp.broadcast_to(jnp.arange(keys.shape[1], dtype=jnp.int32), keys.shape[:2])
        out = attention(q, keys, values, positions, key_pos, sliding_window)
        layers = self.layers[:layer] + ((keys, values),) + self.layers[layer + 1:]
        return out, DenseKVCache(layers)


@functools.lru_cache(maxsize=16)
def _abstract_model(config: ModelConfig, dtype) -> tuple[nnx.GraphDef, nnx.State]:
    return nnx.split(nnx.eval_shape(lambda: Decoder(config, dtype=dtype, rngs=nnx.Rngs(0))))


def model(config: ModelConfig, params: Params) -> Decoder:
    """The Decoder module holding `params` (its graph built abstractly: nothing is initialised)."""
    graphdef, _ = _abstract_model(config, jnp.float32)
    return nnx.merge(graphdef, params)


def forward(params: Params, tokens: Int[Array, "b t"], positions: Int[Array, "b t"],
            cache: KVCache | None = None, *, config: ModelConfig,
            logits_at: Int[Array, "b"] | None = None, experts: ExpertPlan = ExpertPlan()):
    """Logits f32[B, T, V] for `tokens` at `positions` (f32[B, 1, V] at index `logits_at[b]` of each
    row when given), and the updated cache (None without one). `experts`: how an MoE model's experts
    run (their shards, the grouped matmul)."""
    return model(config, params)(tokens, positions, cache, logits_at, experts)


def forward_hidden(params: Params, tokens: Int[Array, "b t"], positions: Int[Array, "b t"],
                   cache: KVCache | None = None, *, config: ModelConfig, experts: ExpertPlan = ExpertPlan(),
                   valid: Array | None = None):
    """The normed hidden states [B, T, D] feeding the vocabulary head (`head(params, x)` of any of
    them gives their logits), the updated cache, and the router's statistics of the `valid` tokens:
    i32[MoE layers, X] tokens per expert."""
    return model(config, params).hidden(tokens, positions, cache, experts, valid)


def head(params: Params, x: Float[Array, "b t d"], *, config: ModelConfig) -> Float[Array, "b t v"]:
    """Logits f32[B, T, V] of hidden states from `forward_hidden`."""
    return model(config, params).head(x)


def abstract_params(config: ModelConfig, dtype=jnp.float32) -> Params:
    """The params tree as `jax.ShapeDtypeStruct`s, without allocating anything."""
    _, state = _abstract_model(config, jnp.dtype(dtype))
    return nnx.to_pure_dict(state)


def param_axes(config: ModelConfig) -> dict[str, Any]:
    """The params tree with each leaf replaced by its tuple of logical axis names."""
    _, state = _abstract_model(config, jnp.float32)
    axes = jax.tree.map(lambda v: v.get_metadata()["axes"], state,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.to_pure_dict(axes) if isinstance(axes, nnx.State) else axes


def init_params(config: ModelConfig, seed: int = 0, dtype=jnp.float32) -> Params:
    """Random weights (normal, std 0.02; norms at one) — for tests and benchmarks of large shapes."""
    return nnx.to_pure_dict(nnx.state(Decoder(config, dtype=dtype, rngs=nnx.Rngs(seed))))


def quantized_geometries(config: ModelConfig) -> dict[tuple, quant.Geometry]:
    """The path in the params tree of each quantized weight of `config` → its geometry."""
    graphdef, state = _abstract_model(config, jnp.float32)
    model = nnx.merge(graphdef, state)
    return {tuple(path): node.geometry for path, node in nnx.iter_graph(model)
            if isinstance(node, QuantizedWeight)}


def quantize_params(params: Params, config: ModelConfig) -> Params:
    """Float params (numpy, the converter's) → the params of `config`, whose `quantization` names the
    format: each linear weight replaced by its quantized parts (weights already held quantized, a
    GGUF's kept blocks, are checked), in a new tree; `params` itself is left as it is. ValueError
    when the format cannot lay out a weight."""
    out = jax.tree.map(lambda a: a, params)  # a new tree of the same leaves
    for path, geometry in quantized_geometries(config).items():
        parent = functools.reduce(lambda d, k: d[k], path[:-1], out)
        w = parent[path[-1]]
        if isinstance(w, dict):  # kept as the source stored it (a GGUF's blocks, an fp8 checkpoint's)
            name = "/".join(map(str, path))
            try:
                parent[path[-1]] = w = quant.collapse_scales(w, geometry)
            except ValueError as e:
                raise ValueError(f"{name}: {e}") from None
            quant.check_parts(w, geometry, name)
            continue
        if tuple(w.shape) != geometry.shape:
            raise ValueError(f"{'/'.join(map(str, path))}: shape {tuple(w.shape)}, expected {geometry.shape}")
        parent[path[-1]] = quant.quantize(np.asarray(w, np.float32), geometry)
    return out
