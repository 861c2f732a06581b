"""Quantized weights (models/quant.py): each format's matmul against its f32 reference, the rounding
bound, 4-bit packing, and a quantized decoder against the float decoder of its dequantized weights —
on one device and split over tensor-parallel meshes."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from meshserve.models import decoder, quant
from meshserve.models.config import ModelConfig
from meshserve.sharding.mesh import MeshConfig

RNG = np.random.default_rng(0)
FORMATS = list(quant.FORMATS)

# (shape, batch axes, contraction axes): q_proj, o_proj, down_proj and an MoE's stacked experts
WEIGHTS = [((256, 4, 64), 0, 1), ((4, 64, 256), 0, 2), ((512, 256), 0, 1), ((3, 256, 128), 1, 1)]


def geometry(shape, batch, contract, fmt) -> quant.Geometry:
    return quant.Geometry(shape, batch, contract, quant.get_format(fmt))


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_quantized_matmul_equals_its_f32_reference(fmt):
    """x · w for the quantized w equals x' @ dequantize(w) in f32 within 1e-5, x' being x (weight only)
    or x as the dynamic format's matmul sees it (each row quantized with its own scale)."""
    f = quant.get_format(fmt)
    for shape, _, contract in WEIGHTS[:3]:
        g = geometry(shape, 0, contract, fmt)
        w = (RNG.standard_normal(shape) * 0.05).astype(np.float32)
        parts = {k: jnp.asarray(v) for k, v in quant.quantize(w, g).items()}
        K = int(np.prod(shape[:contract]))
        for rows in (1, 3, 16):
            x = jnp.asarray(RNG.standard_normal((rows, K)), jnp.float32)
            got = jax.jit(lambda x, p: quant.dot(x, p, g))(x, parts)
            seen = x if f.activations is None else quant.reference_activations(x, f)
            want = np.asarray(seen, np.float64) @ np.asarray(quant.dequantize(parts, g), np.float64).reshape(K, -1)
            assert got.shape == (rows, want.shape[1])
            np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-5 * max(1.0, np.abs(want).max()))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape,batch,contract", WEIGHTS)
def test_quantize_rounds_to_the_nearest_step(fmt, shape, batch, contract):
    """Every element dequantizes to within half a step of its float value (integer formats), or
    within fp8 e4m3's relative precision (2^-4) of its scaled value; scales have the block layout."""
    g = geometry(shape, batch, contract, fmt)
    w = (RNG.standard_normal(shape) * 0.05).astype(np.float32)
    parts = quant.quantize(w, g)
    assert parts["q"].shape == g.q_shape and parts["q"].dtype == g.q_dtype
    assert parts["scale"].shape == g.scale_shape
    back = np.asarray(quant.dequantize({k: jnp.asarray(v) for k, v in parts.items()}, g))
    ones = {"q": jnp.asarray(_ones_q(g)), "scale": jnp.asarray(parts["scale"])}
    if g.format.zero:
        ones["zero"] = jnp.zeros(g.scale_shape)
    step = np.asarray(quant.dequantize(ones, g))  # each element's scale
    err = np.abs(back - w)
    if g.format.dtype == "float8_e4m3fn":
        assert np.all(err <= np.abs(w) * 2**-4 + step * 2**-9)  # e4m3: 3 mantissa bits; subnormals
    else:
        assert np.all(err <= step / 2 * (1 + 1e-5) + 1e-7)
    assert np.all(err <= np.abs(w) + step)  # and nothing is clipped


def _ones_q(g: quant.Geometry, value: int = 1) -> np.ndarray:
    """q holding `value` everywhere (a 4-bit one as stored: the zero point 8 added unless asymmetric)."""
    if not g.format.packed:
        return np.full(g.q_shape, value, g.q_dtype)
    v = value if g.format.zero else value + 8
    return np.asarray(quant.pack_int4(np.full(g.shape, v), g.pack_axis, g.block[g.pack_axis]))


def test_4bit_packing_is_ggufs_layout_and_round_trips():
    """Within a group of 32: byte j holds element j (low nibble) and element j + 16 (high)."""
    v = RNG.integers(0, 16, (64, 3)).astype(np.uint8)
    packed = quant.pack_int4(v, 0, 32)
    assert packed.shape == (32, 3)
    assert np.array_equal(packed[5], v[5] | (v[21] << 4)) and np.array_equal(packed[16 + 2], v[34] | (v[50] << 4))
    assert np.array_equal(np.asarray(quant.unpack_int4(jnp.asarray(packed), 0, 32)), v)


def test_block_layouts():
    assert quant.split_block((4, 64), 128) == (2, 64)
    assert quant.split_block((4, 64), 32) == (1, 32)
    assert quant.split_block((2, 32), 128) == (2, 32)  # fewer elements than a block: one block of all
    with pytest.raises(ValueError, match="do not tile"):
        quant.split_block((576,), 128)
    assert geometry((256, 4, 64), 0, 1, "fp8-block").scale_shape == (2, 2, 1)
    assert geometry((256, 4, 64), 0, 1, "int8").scale_shape == (1, 4, 64)
    assert geometry((4, 64, 256), 0, 2, "int4-g32").scale_shape == (4, 2, 256)
    assert geometry((3, 256, 128), 1, 1, "q4_1").q_shape == (3, 128, 128)


# ---- the decoder ----------------------------------------------------------------------------------

LLAMA = ModelConfig(name="q-llama", architecture="llama", vocab_size=96, hidden_size=128, intermediate_size=256,
                    num_layers=2, num_heads=8, num_kv_heads=4, head_dim=32, max_position_embeddings=128)
QWEN3_MOE = ModelConfig(name="q-moe", architecture="qwen3_moe", vocab_size=96, hidden_size=128,
                        intermediate_size=256, num_layers=2, num_heads=8, num_kv_heads=4, head_dim=32,
                        max_position_embeddings=128, qk_norm=True, num_experts=4, num_experts_per_tok=2,
                        moe_intermediate_size=64)


def dequantized_params(params, config):
    """The float params of a quantized model: each quantized weight replaced by its dequantized value."""
    out = jax.tree.map(lambda a: a, params, is_leaf=lambda x: isinstance(x, dict) and "q" in x)
    for path, g in decoder.quantized_geometries(config).items():
        parent = out
        for k in path[:-1]:
            parent = parent[k]
        parent[path[-1]] = quant.dequantize(parent[path[-1]], g)
    return out


def weight_only(fmt: str) -> bool:
    return quant.get_format(fmt).activations is None


@pytest.mark.parametrize("config", [LLAMA, QWEN3_MOE], ids=["llama", "qwen3-moe"])
@pytest.mark.parametrize("fmt", [f for f in FORMATS if weight_only(f)])
def test_a_quantized_decoder_equals_the_float_one_of_its_dequantized_weights(config, fmt):
    float_params = jax.tree.map(np.asarray, decoder.init_params(config, seed=1))
    qconfig = dataclasses.replace(config, quantization=fmt)
    params = decoder.quantize_params(float_params, qconfig)
    assert jax.tree.structure(params) == jax.tree.structure(decoder.abstract_params(qconfig))
    tokens = jnp.asarray(RNG.integers(0, config.vocab_size, (2, 6)))
    positions = jnp.broadcast_to(jnp.arange(6), (2, 6))
    got, _ = decoder.forward(params, tokens, positions, config=qconfig)
    want, _ = decoder.forward(dequantized_params(params, qconfig), tokens, positions, config=config)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-5)
    exact, _ = decoder.forward(float_params, tokens, positions, config=config)
    assert 0 < float(jnp.max(jnp.abs(got - exact)))  # it was quantized


@pytest.mark.parametrize("tensor", [2, 4])
@pytest.mark.parametrize("fmt", ["int8", "w8a8", "fp8-block", "int4-g32", "q4_1"])
def test_tensor_parallel_equals_one_device(fmt, tensor):
    """Scales are sharded with their weights (their logical axes are the weight's): the quantized
    decoder's logits on tensor=2 and 4 equal one device's."""
    qconfig = dataclasses.replace(LLAMA, quantization=fmt)
    params = decoder.quantize_params(jax.tree.map(np.asarray, decoder.init_params(LLAMA, seed=2)), qconfig)
    tokens = jnp.asarray(RNG.integers(0, LLAMA.vocab_size, (2, 5)))
    positions = jnp.broadcast_to(jnp.arange(5), (2, 5))
    one, _ = jax.jit(lambda p: decoder.forward(p, tokens, positions, config=qconfig))(params)
    layout = MeshConfig.from_dict({"axes": {"data": 1, "tensor": tensor}, "num_devices": tensor}).build()
    placed = layout.place(params, qconfig)
    q = placed["layers"][0]["attn"]["q_proj"]
    if q["scale"].shape[1] % tensor == 0:  # (fp8-block's 128-wide blocks: 2 over 8 heads here)
        assert q["q"].sharding.spec == q["scale"].sharding.spec  # split on the same (heads) axis
        assert len({str(s.index) for s in q["scale"].addressable_shards}) == tensor
    split, _ = jax.jit(lambda p: decoder.forward(p, tokens, positions, config=qconfig))(placed)
    np.testing.assert_allclose(np.asarray(split), np.asarray(one), rtol=0, atol=1e-5)


# ---- checkpoints --------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["w8a8", "fp8-block", "q4_1"])
def test_a_quantized_checkpoint_restores_its_parts_into_their_shardings(tmp_path, fmt):
    """Orbax holds q (int8, fp8, packed uint8), scales and zeros as they are; restored straight into
    a tensor=2 layout, the logits equal the in-memory model's."""
    from meshserve.models.checkpoint import load_checkpoint, save_checkpoint
    from meshserve.sharding.mesh import load_sharded
    from tests.helpers import random_checkpoint

    base = random_checkpoint(LLAMA, tmp_path / "tok", seed=5)
    qconfig = dataclasses.replace(LLAMA, quantization=fmt)
    params = decoder.quantize_params(jax.tree.map(np.asarray, base.params), qconfig)
    folder = save_checkpoint(tmp_path / "ckpt", qconfig, params, base.tokenizer)
    one = load_checkpoint(folder, progress=False)
    assert one.config.quantization == fmt
    for got, want in zip(jax.tree.leaves(one.params), jax.tree.leaves(params)):
        assert got.dtype == want.dtype and np.array_equal(np.asarray(got).view(np.uint8), np.asarray(want).view(np.uint8))
    layout = MeshConfig.from_dict({"axes": {"data": 1, "tensor": 2}, "num_devices": 2}).build()
    split = load_sharded(folder, layout, progress=False)
    up = split.params["layers"][1]["mlp"]["up_proj"]
    assert up["q"].sharding.spec[1] == "tensor" and len(up["scale"].addressable_shards) == 2
    tokens = jnp.asarray([[3, 1, 4, 1, 5]])
    positions = jnp.arange(5)[None]
    run = jax.jit(decoder.forward, static_argnames="config")
    want = np.asarray(run(params, tokens, positions, config=qconfig)[0])
    np.testing.assert_allclose(np.asarray(run(split.params, tokens, positions, config=qconfig)[0]), want,
                               rtol=0, atol=1e-5 * np.abs(want).max())  # (the weights are scaled up 20×)


def test_scales_of_the_wrong_shape_fail_at_load_naming_the_array(tmp_path):
    from meshserve.models.checkpoint import load_checkpoint, save_checkpoint
    from meshserve.models.errors import CheckpointError
    from tests.helpers import random_checkpoint

    base = random_checkpoint(LLAMA, tmp_path / "tok", seed=5)
    qconfig = dataclasses.replace(LLAMA, quantization="int4-g32")
    params = decoder.quantize_params(jax.tree.map(np.asarray, base.params), qconfig)
    down = params["layers"][1]["mlp"]["down_proj"]
    down["scale"] = down["scale"][:4]  # groups of 64, where the format says 32
    folder = save_checkpoint(tmp_path / "ckpt", qconfig, params, base.tokenizer)
    with pytest.raises(CheckpointError, match=r"layers/1/mlp/down_proj/scale has shape \(4, 128\), its "
                                              r"config.yaml expects \(8, 128\)"):
        load_checkpoint(folder, progress=False)


def test_a_format_that_cannot_lay_out_the_model_fails_conversion_naming_the_weight():
    config = dataclasses.replace(LLAMA, hidden_size=192, num_heads=6, num_kv_heads=3)
    params = jax.tree.map(np.asarray, decoder.init_params(config, seed=0))
    with pytest.raises(ValueError, match="blocks of 128 do not tile axes of sizes \\(192,\\)"):
        decoder.quantize_params(params, dataclasses.replace(config, quantization="int4-g128"))


def test_the_speed_formats_quantize_the_vocabulary():
    """w8a8: the tied embedding is int8 with a scale per vocabulary row; a lookup dequantizes its rows
    exactly, and the head is the dynamic int8 matmul against it."""
    config = dataclasses.replace(LLAMA, tie_word_embeddings=True, quantization="w8a8")
    float_params = jax.tree.map(np.asarray, decoder.init_params(dataclasses.replace(config, quantization=None), seed=4))
    params = jax.tree.map(jnp.asarray, decoder.quantize_params(float_params, config))
    embed = params["embed"]
    assert embed["q"].dtype == jnp.int8 and embed["scale"].shape == (LLAMA.vocab_size, 1)
    g = decoder.quantized_geometries(config)[("embed",)]
    table = quant.dequantize(embed, g)
    model = decoder.model(config, params)
    tokens = jnp.asarray([[5, 9, 0]])
    np.testing.assert_array_equal(np.asarray(model.embedding(tokens)), np.asarray(table[tokens]))
    x = jnp.asarray(RNG.standard_normal((1, 3, LLAMA.hidden_size)), jnp.float32)
    want = np.asarray(quant.reference_activations(x, g.format)) @ np.asarray(table).T
    np.testing.assert_allclose(np.asarray(model.head(x)), want, rtol=0, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("fmt", ["w8a8", "q4_1"])
def test_the_engine_serves_a_quantized_model_as_its_dense_forward_does(tmp_path, fmt):
    """Paged KV, continuous batching and the AOT programs over quantized weights: greedy tokens equal
    the no-cache forward pass of the same quantized params."""
    from meshserve.runtime.engine import Engine
    from meshserve.runtime.sampling import SamplingParams
    from tests.helpers import random_checkpoint
    from tests.runtime.conftest import greedy_reference
    from tests.sharding.test_sharded_engine import SMALL

    base = random_checkpoint(LLAMA, tmp_path / "tok", seed=6)
    qconfig = dataclasses.replace(LLAMA, quantization=fmt)
    params = jax.tree.map(jnp.asarray, decoder.quantize_params(jax.tree.map(np.asarray, base.params), qconfig))
    ckpt = dataclasses.replace(base, config=qconfig, params=params)
    prompts = [RNG.integers(0, 90, n).tolist() for n in (5, 11, 3)]
    engine = Engine(ckpt, SMALL)
    out = engine.generate(prompts, SamplingParams(max_tokens=6, ignore_eos=True))
    assert [list(c.token_ids) for c in out] == [greedy_reference(ckpt, p, 6) for p in prompts]
    # what the APIs say of it: /v1/models, and the model card a Dynamo worker publishes
    from meshserve.serving.info import EngineInfo
    from meshserve.serving.worker import model_card

    info = EngineInfo.of(engine)
    assert info.numerics == {"dtype": "float32", "quantization": fmt, "kv_cache_dtype": "float32"}
    card = json.loads((model_card(info, tmp_path) / "config.json").read_text())
    assert card["quantization_config"] == {"quant_method": "meshserve", "format": fmt}
