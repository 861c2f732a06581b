"""The int8 / fp8 KV cache: codes and per-token-per-head scales, outliers, capacity, the engine
against a dense forward pass whose keys and values are quantized the same way, and pages that
leave the pool (host tier, store, transfer) and come back exact."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from meshserve.models.config import CONFIG_DIR, ModelConfig
from meshserve.models.decoder import forward
from meshserve.models.errors import ConfigError
from meshserve.runtime import kv_quant
from meshserve.runtime.engine import Engine, EngineConfig
from meshserve.runtime.kv_cache import KVPool, _decode_tiled, page_bytes, zeros_pool
from meshserve.runtime.kv_manager import kv_pages
from meshserve.runtime.kv_tiers import StoreTier, _gather, _scatter
from meshserve.runtime.kv_transfer import TransferError
from meshserve.runtime.sampling import SamplingParams
from meshserve.runtime.target import Target
from meshserve.serving.info import EngineInfo
from meshserve.serving.worker import model_card

INT8, FP8 = jnp.dtype(jnp.int8), jnp.dtype(jnp.float8_e4m3fn)
QUANTIZED = pytest.mark.parametrize("dtype", [INT8, FP8], ids=["int8", "fp8"])


# ---- codes and scales --------------------------------------------------------------------------------


@QUANTIZED
def test_each_token_and_head_gets_its_own_scale(dtype):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 5, 2, 64)).astype(np.float32) * rng.uniform(1e-3, 1e3, (3, 5, 2, 1))
    codes, scales = kv_quant.quantize(jnp.asarray(x), dtype)
    assert codes.dtype == dtype and codes.shape == x.shape and scales.dtype == jnp.int8 and scales.shape == (3, 5, 2)
    scale = np.exp2(np.asarray(scales, np.float64) / 4)
    qmax = 127 if dtype == INT8 else 448
    top = np.abs(x).max(-1) / scale
    # the smallest quarter-octave scale that fits the row's largest element
    assert (top <= qmax * (1 + 1e-6)).all() and (top > qmax * 2 ** -0.25 * (1 - 1e-6)).all()
    err = np.abs(np.asarray(kv_quant.dequantize(codes, scales, jnp.float32), np.float64) - x)
    if dtype == INT8:
        assert (err <= 0.5 * scale[..., None] * (1 + 1e-6)).all()  # round to nearest code
    else:  # e4m3: 3 mantissa bits (subnormals below 2^-6 · scale)
        assert (err <= np.maximum(np.abs(x) * 2 ** -4, 2 ** -10 * scale[..., None]) * (1 + 1e-6)).all()


def test_zeros_tiny_and_huge_vectors_across_the_scale_range():
    """Scales span 2^-32 .. 2^31.75: a zero vector stays zeros, 1e-7 and 1e10 keep their precision,
    and a vector past the range saturates (finite) rather than turning to inf or NaN."""
    x = jnp.asarray([[0.0] * 8, [1e10] * 8, [-3e-7] + [1e-7] * 7, [1e30] * 8], jnp.float32)
    for dtype in (INT8, FP8):
        back = np.asarray(kv_quant.dequantize(*kv_quant.quantize(x, dtype), jnp.float32))
        assert np.isfinite(back).all() and not back[0].any()
        np.testing.assert_allclose(back[1:3], x[1:3], rtol=2 ** -4)
        assert (back[3] == back[3, 0]).all() and back[3, 0] > 1e11


def _layer_config(kv_heads: int, head_dim: int) -> ModelConfig:
    return ModelConfig(name="t", architecture="llama", vocab_size=8, hidden_size=8, intermediate_size=8,
                       num_layers=1, num_heads=4, num_kv_heads=kv_heads, head_dim=head_dim, max_position_embeddings=64)


def _pool(dtype, pages: int, page_size: int, kv_heads: int, head_dim: int) -> KVPool:
    return zeros_pool(_layer_config(kv_heads, head_dim), pages, page_size, dtype)


def test_kv_outliers_keep_attention_within_1e_2_under_dynamic_scales_and_not_under_a_static_one():
    """One token's value vector 100× the others' (~600 at its largest, past fp8's 448 and int8's 127):
    its own scale takes it, the other tokens keep theirs. A static per-tensor scale of 1.0 clips it
    and rounds every other token to whole numbers (int8) or 3 mantissa bits of the unscaled value."""
    T, PS, K, E, H = 64, 16, 1, 64, 4
    rng = np.random.default_rng(0)
    k = jnp.asarray(rng.standard_normal((1, T, K, E)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((1, T, K, E)) * 2, jnp.float32).at[0, 17].multiply(100)
    q = jnp.asarray(rng.standard_normal((1, 1, H, E)), jnp.float32)
    pages, slots = jnp.asarray(1 + np.arange(T) // PS)[None], jnp.asarray(np.arange(T) % PS)[None]
    table = jnp.asarray([[1, 2, 3, 4]], jnp.int32)

    def attend(dtype, keys=k, values=v):
        pool = _pool(dtype, 5, PS, K, E).write(0, pages, slots, keys, values)
        return _decode_tiled(q, pool.layer(0), table, None, jnp.asarray([T - 1]), None, None)

    ref = attend(jnp.float32)
    rel = lambda out: float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
    static = {d: rel(attend(jnp.float32, kv_quant.static_quantize(k, d), kv_quant.static_quantize(v, d)))
              for d in (INT8, FP8)}
    assert rel(attend(INT8)) <= 1e-2 < static[INT8]
    # fp8's own precision (3 mantissa bits: up to 2^-4 per element) is the bound; a static scale adds clipping
    assert rel(attend(FP8)) <= 5e-2 < static[FP8]
    assert static[INT8] > 0.5 and static[FP8] > 2 * rel(attend(FP8))


@QUANTIZED
def test_pages_leave_a_quantized_pool_as_bytes_and_come_back_exact(dtype):
    """The tiers' copy programs: [pages, 2·layers, page_size, kv_heads, head_dim + 1] uint8 out (the
    codes' bytes, then the scale exponent), and written into another pool, the same arrays."""
    rng = np.random.default_rng(2)
    pool = _pool(dtype, 6, 4, 2, 8)
    x = jnp.asarray(rng.standard_normal((1, 24, 2, 8)) * rng.uniform(0.01, 100, (1, 24, 2, 1)), jnp.float32)
    pages, slots = jnp.asarray(np.arange(24) // 4 % 5 + 1)[None], jnp.asarray(np.arange(24) % 4)[None]
    pool = pool.write(0, pages, slots, x, -x)
    data = _gather(pool, jnp.asarray([3, 1, 5]))
    assert data.dtype == jnp.uint8 and data.shape == (3, *pool.page_shape) == (3, 2, 4, 2, 9)
    back = _scatter(_pool(dtype, 6, 4, 2, 8), jnp.asarray([3, 1, 5]), data)
    for got, want in zip(back.layer(0), pool.layer(0)):
        np.testing.assert_array_equal(np.asarray(got[jnp.asarray([3, 1, 5])]).view(np.uint8),
                                      np.asarray(want[jnp.asarray([3, 1, 5])]).view(np.uint8))


def test_scales_decode_exactly_as_float32_quarter_octaves():
    """Every int8 exponent s: the float32 nearest 2^(r/4), r = s mod 4, times 2^⌊s/4⌋ exactly (the
    same bits on every backend; exp2 would round differently in XLA and Triton)."""
    s = np.arange(-128, 128)
    quarter = np.float32([1, 2 ** 0.25, 2 ** 0.5, 2 ** 0.75])[s % 4]
    want = quarter * np.exp2(s // 4).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(kv_quant.scale_of(jnp.asarray(s, jnp.int8))), want)


# ---- capacity, configuration, errors -----------------------------------------------------------------


def test_an_8_bit_pool_holds_3_9x_the_tokens_of_float32_and_1_95x_bfloat16():
    """The default model's shapes (head_dim 64): the same kv_cache_bytes, the pool's tokens."""
    model = ModelConfig.from_yaml(CONFIG_DIR / "smollm2-135m.yaml")
    budget = 1 << 30

    def tokens(dtype):
        return kv_pages(page_bytes(model, 16, dtype), 16, 2048, 1, budget) * 16

    f32, bf16 = tokens(jnp.float32), tokens(jnp.bfloat16)
    for dtype in (INT8, FP8):
        assert page_bytes(model, 16, dtype) == 2 * 30 * 16 * 3 * 65  # codes and one scale byte
        assert tokens(dtype) / f32 >= 3.9 and tokens(dtype) / bf16 >= 1.95


def test_the_pool_and_its_pages_carry_the_scales():
    pool = _pool(INT8, 6, 4, 2, 8)
    assert pool.quantized and pool.page_shape == (2, 4, 2, 9) and pool.page_dtype == jnp.uint8
    assert [a.shape for a in pool.layer(0)] == [(6, 4, 2, 8), (6, 4, 2, 8), (6, 4, 2), (6, 4, 2)]
    assert pool.nbytes == 6 * page_bytes(_layer_config(2, 8), 4, INT8) == 6 * 2 * 4 * 2 * 9
    assert not _pool(jnp.bfloat16, 6, 4, 2, 8).quantized


def test_a_kv_dtype_that_is_not_offered_is_a_config_error():
    with pytest.raises(ConfigError, match="kv_cache_dtype must be one of auto, float32, bfloat16, int8, fp8"):
        EngineConfig(kv_cache_dtype="int4")


def test_a_kv_dtype_the_attention_kernel_cannot_read_fails_at_load(tiny_ckpt, monkeypatch):
    """fp8 codes through the Pallas kernels need Triton's fp8 (compute capability 8.9 on): an A100
    is refused at load with one line; int8, the reference attention and Hopper are fine."""
    a100 = Target("gpu", "NVIDIA A100-SXM4-80GB", "8.0")
    with pytest.raises(ConfigError) as e:
        kv_quant.check_readable(FP8, "pallas", a100)
    assert "\n" not in str(e.value) and "fp8" in str(e.value) and "A100" in str(e.value) and "8.0" in str(e.value)
    kv_quant.check_readable(INT8, "pallas", a100)
    kv_quant.check_readable(FP8, "reference", a100)
    kv_quant.check_readable(FP8, "pallas", Target("gpu", "NVIDIA H100 80GB HBM3", "9.0"))
    # the engine asks before it builds anything: here its one CPU device stands in for an A100
    monkeypatch.setattr(Target, "of", staticmethod(lambda device: a100))
    with pytest.raises(ConfigError, match="kv_cache_dtype fp8: attention pallas cannot read fp8"):
        Engine(tiny_ckpt, dataclasses.replace(CONFIG, kv_cache_dtype="fp8"))


# ---- the engine ------------------------------------------------------------------------------------

CONFIG = EngineConfig(page_size=4, kv_cache_bytes=64 * 2 * 2 * 4 * 2 * 9, max_seq_len=128, max_num_seqs=4,
                      max_num_batched_tokens=16, max_prefill_chunk=16, prefill_buckets=(8, 16),
                      decode_buckets=(4,), context_buckets=(32,))


def reference_logits(ckpt, ids: list[int], dtype) -> np.ndarray:
    """Every position's logits of the dense forward pass over `ids`, keys and values quantized."""
    logits, _ = _forward(ckpt.params, jnp.asarray([ids], jnp.int32), jnp.arange(len(ids), dtype=jnp.int32)[None],
                         kv_quant.QuantizedAttention(dtype), config=ckpt.config)
    return np.asarray(logits[0])


_forward = jax.jit(forward, static_argnames="config")


def greedy(ckpt, prompt: list[int], n: int, dtype) -> list[int]:
    """Greedy tokens of the reference, each step over the sequence padded to 64 tokens (attention is
    causal: the padding after the last token changes nothing before it; one compile, not one a length)."""
    ids = list(prompt)
    for _ in range(n):
        logits = reference_logits(ckpt, ids + [0] * (64 - len(ids)), dtype)
        ids.append(int(np.argmax(logits[len(ids) - 1])))
    return ids[len(prompt):]


@QUANTIZED
def test_the_engine_equals_a_dense_forward_pass_with_the_same_quantized_keys_and_values(tiny_ckpt, dtype, tmp_path):
    """Chunked prefill (16-token chunks), decode and prompt scores over an 8-bit pool against the
    no-cache forward pass whose keys and values are quantized per token and head the same way."""
    engine = Engine(tiny_ckpt, dataclasses.replace(CONFIG, kv_cache_dtype=dtype.name.replace("float8_e4m3fn", "fp8")))
    assert engine.pool.dtype == dtype and engine.stats()["page_bytes"] == 2 * 2 * 4 * 2 * 9
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, 260, n).tolist() for n in (3, 21, 40, 9)]
    params = [SamplingParams(max_tokens=8, ignore_eos=True, prompt_logprobs=1 if i == 2 else None)
              for i in range(len(prompts))]
    scored = []
    out = engine.generate(prompts, params, on_output=lambda o: scored.append(o.prompt_logprobs))
    for prompt, completion in zip(prompts, out):
        assert list(completion.token_ids) == greedy(tiny_ckpt, prompt, 8, dtype)
    ref = jax.nn.log_softmax(reference_logits(tiny_ckpt, prompts[2] + [0] * (64 - 40), dtype), axis=-1)
    scores = next(s for s in scored if s)
    assert len(scores) == 40
    for p, s in enumerate(scores[1:]):
        assert s.logprob == pytest.approx(float(ref[p, prompts[2][p + 1]]), abs=1e-4)
    assert engine.kv.num_free == engine.kv.num_usable
    # what the APIs say of it: /v1/models, and the model card a Dynamo worker publishes
    info = EngineInfo.of(engine)
    assert info.numerics == {"dtype": "float32", "quantization": None, "kv_cache_dtype": dtype.name}
    card = json.loads((model_card(info, tmp_path) / "config.json").read_text())
    assert (card["torch_dtype"], card["kv_cache_dtype"]) == ("float32", dtype.name)


def _shared_prefix_prompts():
    rng = np.random.default_rng(4)
    prefix = rng.integers(0, 260, 37).tolist()
    return [prefix + rng.integers(0, 260, n).tolist() for n in (1, 5, 12)]


def _run_one(engine, prompt, params):
    engine.add_request(prompt, params)
    tokens, cached = [], None
    while engine.has_unfinished:
        for out in engine.step():
            tokens.extend(out.token_ids)
            cached = out.cached_tokens if out.finished else cached
    return tokens, cached


def test_quantized_pages_leave_the_pool_and_come_back_exact(tiny_ckpt, tmp_path):
    """int8 pages through host memory, the tensorstore store and a transfer to another engine give
    the tokens of an engine that computed them; pages of another KV dtype are never read as these."""
    # a step budget that takes a whole prefix's copies in from the lower tiers in one step
    int8 = dataclasses.replace(CONFIG, kv_cache_dtype="int8", max_num_batched_tokens=64)
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    prompts = _shared_prefix_prompts()
    plain = Engine(tiny_ckpt, dataclasses.replace(int8, enable_prefix_caching=False))
    want = [list(c.token_ids) for c in plain.generate(prompts, params)]

    tiered = Engine(tiny_ckpt, dataclasses.replace(int8, host_kv_bytes=8 * plain.page_bytes, kv_store=str(tmp_path),
                                                   kv_transfer=True))
    assert _run_one(tiered, prompts[0], params) == (want[0], 0)
    assert tiered.evict_prefix_cache() > 0  # 9 pages: 8 fit in host memory, the oldest goes on to the store
    assert _run_one(tiered, prompts[1], params) == (want[1], 36)
    stats = tiered.stats()
    assert (stats["host_hit_pages"], stats["store_hit_pages"]) == (8, 1)
    stored = [p.stat().st_size for p in tmp_path.rglob("*") if p.is_file()]
    assert stored and set(stored) == {StoreTier.header_bytes(4) + 2 * 2 * 4 * 2 * 9}  # codes and scales, whole

    other = Engine(tiny_ckpt, dataclasses.replace(int8, kv_transfer=True))
    pages = tiered.export_prompt(prompts[2])
    assert pages.arrays[0].dtype == jnp.uint8 and pages.arrays[0].shape[1:] == (2 * 2, 4, 2, 9)
    assert other.import_prompt(prompts[2], pages) == 9
    assert _run_one(other, prompts[2], params) == (want[2], 36)

    fp8 = Engine(tiny_ckpt, dataclasses.replace(CONFIG, kv_cache_dtype="fp8", kv_transfer=True))
    assert fp8.fingerprint != other.fingerprint  # the prefix cache's hashes and every tier are salted with it
    with pytest.raises(TransferError, match="another model"):
        fp8.import_prompt(prompts[2], pages)


def test_a_sharded_int8_pool_gives_the_tokens_of_one_device(tiny_ckpt):
    """Scales split with their codes (pages over data, kv heads over tensor): both attention paths
    on a data=2 × tensor=4 mesh give the one-device tokens."""
    from tests.sharding.test_sharded_engine import SMALL, WIDE, random_ckpt, run

    ckpt = random_ckpt(tiny_ckpt, WIDE)
    config = dataclasses.replace(SMALL, kv_cache_dtype="int8")
    one, _ = run(ckpt, (1, 1), config)
    tokens, engine = run(ckpt, (2, 4), config)
    assert tokens == one
    assert tuple(engine.pool.k_exp[0].sharding.spec) == ("data", None, "tensor")
    tokens, engine = run(ckpt, (2, 4), dataclasses.replace(config, attention="pallas"), n=4)
    assert engine.attention == "pallas" and tokens == [t[:4] for t in one]
