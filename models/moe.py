"""Mixture-of-experts blocks as pure functions: route each token to its top-k experts, run every expert
on the tokens routed to it, and sum the results weighted by the router. Dropless: no token is ever
turned away for lack of room, whatever the router does.

    ids, weights = route(x, router, k, normalize)                  # [N, k] each
    y = experts_mlp(x, ids, weights, gate, up, down, plan)         # [N, D]

Two ways to run the experts, chosen per call from its static token count:
- all experts: every token through every (local) expert, combined by the router's weights (zeros for
  experts it did not pick): one batched matmul, each expert's weights read once. Chosen when that
  costs at most twice the FLOPs the picks need (few experts, many tokens each).
- grouped: the (token, expert) pairs sorted by expert into blocks of `b` rows, each block one
  expert's, each group padded to whole blocks; one grouped MLP over the blocks (`grouped_mlp`); the
  results scattered back to their tokens. The blocks are bounded statically (a group of n rows takes
  ceil(n / b) blocks), so any routing fits; only the blocks in use are computed on CPUs.

Expert parallelism, replicate and sum: with the experts split over S shards (the mesh's `expert` axis),
every shard sees all tokens, runs only its own experts and the shards' outputs are summed. Both forms
are written over an explicit leading shard axis of the expert weights ([S, X / S, …]); with the
weights placed on the `expert` mesh axis, XLA's partitioner runs each shard's slice on its devices and
turns the final sum into an all-reduce.

Shapes: N tokens, D hidden, X experts (XL per shard), F expert width, k experts per token, b rows per block.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

GROUPED_MLPS = ("loop", "ragged_dot")
METHODS = ("auto", "all_experts", "grouped")


@dataclasses.dataclass(frozen=True)
class ExpertPlan:
    """How a program runs its experts: a property of where they are placed, not of the model.

    shards: the size of the mesh axis the experts are split over (1: all on each device).
    grouped: "loop" (a loop over the blocks in use, each a matmul against its expert's weights: reads
      only the experts picked; CPUs) or "ragged_dot" (`jax.lax.ragged_dot`, which GPU and TPU compilers
      lower to their own grouped GEMM).
    method: "auto" chooses by token count; tests force one form.
    """

    shards: int = 1
    grouped: str = "loop"
    method: str = "auto"

    def __post_init__(self):
        if self.shards < 1:
            raise ValueError(f"expert shards must be >= 1, got {self.shards}")
        if self.grouped not in GROUPED_MLPS:
            raise ValueError(f"grouped must be one of {', '.join(GROUPED_MLPS)}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}")


def route(x: Float[Array, "n d"], router: Float[Array, "d x"], k: int,
          normalize: bool) -> tuple[Int[Array, "n k"], Float[Array, "n k"]]:
    """The top-k experts of each token and their weights (f32): softmax over all experts, the k most
    probable, renormalised to sum to 1 when `normalize` (Mixtral, Qwen3-MoE) or not (Qwen2-MoE)."""
    logits = jnp.dot(x, router, preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    weights, ids = jax.lax.top_k(probs, k)
    if normalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return ids.astype(jnp.int32), weights


def experts_mlp(x: Float[Array, "n d"], ids: Int[Array, "n k"], weights: Float[Array, "n k"],
                gate: Float[Array, "x d f"], up: Float[Array, "x d f"], down: Float[Array, "x f d"],
                plan: ExpertPlan = ExpertPlan()) -> Float[Array, "n d"]:
    """Σ_k weights[n, k] · SwiGLU expert ids[n, k] (x[n]), dropless."""
    N, k = ids.shape
    X, D, F = gate.shape
    S = plan.shards
    if X % S:
        raise ValueError(f"{X} experts cannot be split over {S} shards")
    XL = X // S
    shard_weights = [w.reshape(S, XL, *w.shape[1:]) for w in (gate, up, down)]
    method = plan.method
    if method == "auto":  # all of a shard's experts on every token: at most twice the picks' FLOPs
        method = "all_experts" if XL <= 2 * k else "grouped"
    if method == "all_experts":
        out = _all_experts(x, ids, weights, *shard_weights)
    else:
        # ragged_dot takes groups of any size: no padding, one row a block
        b, blocks = block_layout(N * k, XL) if plan.grouped == "loop" else (1, N * k)
        out = _grouped(x, ids, weights, *shard_weights, b, blocks, plan.grouped)
    return out.astype(x.dtype)


def block_layout(assignments: int, local_experts: int) -> tuple[int, int]:
    """(rows per block, blocks) for `assignments` (token, expert) pairs over `local_experts` groups.

    A block holds about twice an even group's rows (a power of two, 1 to 256): one row per block when a
    decode step's few tokens spread over many experts, larger blocks for a prefill's many (measured on
    CPUs: the loop's cost per block against the padding's). G groups in use of n_e rows take
    Σ ceil(n_e / b) <= (A + G (b - 1)) / b blocks, G <= min(A, XL)."""
    even = -(-2 * assignments // local_experts)
    b = min(256, 1 << (even - 1).bit_length())
    return b, -(-(assignments + min(assignments, local_experts) * (b - 1)) // b)


def _all_experts(x, ids, weights, gate, up, down):
    """Every token through every expert of every shard; the router's weights select."""
    N = x.shape[0]
    S, XL = gate.shape[:2]
    combine = jnp.zeros((N, S * XL), jnp.float32).at[jnp.arange(N)[:, None], ids].add(weights)
    combine = combine.T.reshape(S, XL, N, 1)
    xs = jnp.broadcast_to(x, (XL, *x.shape))  # a batched matmul per expert: no transposed weights

    def shard(gate, up, down, combine):
        h = jax.nn.silu(jnp.einsum("xnd,xdf->xnf", xs, gate)) * jnp.einsum("xnd,xdf->xnf", xs, up)
        y = jnp.einsum("xnf,xfd->xnd", h, down, preferred_element_type=jnp.float32)
        return jnp.sum(y * combine, axis=0)

    return jnp.sum(jax.vmap(shard)(gate, up, down, combine), axis=0)


def _grouped(x, ids, weights, gate, up, down, b, blocks, how):
    """The (token, expert) pairs sorted by expert into blocks, one grouped MLP, scattered back."""
    N, D = x.shape
    k = ids.shape[1]
    S, XL = gate.shape[:2]
    A, rows = N * k, blocks * b
    token = jnp.repeat(jnp.arange(N, dtype=jnp.int32), k)
    flat_ids, flat_w = ids.reshape(A), weights.reshape(A)

    def shard(s, gate, up, down):
        local = jnp.where(flat_ids // XL == s, flat_ids % XL, XL)  # XL: another shard's expert
        order = jnp.argsort(local, stable=True)
        expert = local[order]
        sizes = jnp.bincount(local, length=XL + 1)[:XL]
        padded = (sizes + b - 1) // b * b
        start, padded_start = jnp.cumsum(sizes) - sizes, jnp.cumsum(padded) - padded
        e = jnp.minimum(expert, XL - 1)
        dest = jnp.where(expert < XL, padded_start[e] + jnp.arange(A) - start[e], rows)  # rows: dropped
        row_token = jnp.zeros(rows, jnp.int32).at[dest].set(token[order], mode="drop")
        row_weight = jnp.zeros(rows, jnp.float32).at[dest].set(flat_w[order], mode="drop")
        block_expert = jnp.searchsorted(jnp.cumsum(padded), jnp.arange(blocks) * b, side="right")
        block_expert = jnp.minimum(block_expert, XL - 1).astype(jnp.int32)  # spare blocks: zero weight
        y = grouped_mlp(x[row_token], gate, up, down, padded, block_expert, jnp.sum(padded) // b, b, how)
        return jnp.zeros((N, D), jnp.float32).at[row_token].add(y * row_weight[:, None])

    return jnp.sum(jax.vmap(shard)(jnp.arange(S), gate, up, down), axis=0)


def grouped_mlp(rows: Float[Array, "m d"], gate: Float[Array, "x d f"], up: Float[Array, "x d f"],
                down: Float[Array, "x f d"], group_sizes: Int[Array, "x"], block_expert: Int[Array, "blocks"],
                used_blocks: Int[Array, ""], b: int, how: str = "loop") -> Float[Array, "m d"]:
    """SwiGLU expert e (rows[i]) in f32 for the rows sorted by group into blocks of `b` (each group a
    whole number of blocks, `block_expert` naming each block's expert, the first `used_blocks` in use;
    rows past them are zeros or are weighted out by the caller).

    The one place the grouped computation lives, so a platform can get its own kernel:
    "loop" runs the blocks in use one after another, each three matmuls against its expert's weights
    (reads only the experts picked, computes only the blocks in use: XLA:CPU has no grouped GEMM);
    "ragged_dot" is XLA's grouped matmul (GPU and TPU compilers lower it to their own)."""
    if how == "ragged_dot":
        def matmul(a, w):
            return jax.lax.ragged_dot(a, w, group_sizes, preferred_element_type=jnp.float32)

        h = jax.nn.silu(matmul(rows, gate)) * matmul(rows, up)
        return matmul(h.astype(rows.dtype), down)

    def block(i, out):
        e = block_expert[i]
        x = jax.lax.dynamic_slice_in_dim(rows, i * b, b)
        h = jax.nn.silu(x @ gate[e]) * (x @ up[e])
        y = jnp.dot(h, down[e], preferred_element_type=jnp.float32)
        return jax.lax.dynamic_update_slice_in_dim(out, y, i * b, axis=0)

    return jax.lax.fori_loop(0, used_blocks, block, jnp.zeros((rows.shape[0], down.shape[2]), jnp.float32))


def tokens_per_expert(ids: Int[Array, "n k"], valid: Array, experts: int) -> Int[Array, "x"]:
    """How many of the valid tokens picked each expert (router statistics)."""
    counts = jnp.zeros(experts, jnp.int32)
    return counts.at[ids].add(jnp.broadcast_to(valid[:, None], ids.shape).astype(jnp.int32))
