"""GGUF import: every supported tensor type against transformers reading the same file; the Q/K
un-permutation; bad files."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from meshserve.models.checkpoint import load_checkpoint
from meshserve.models.convert import convert
from meshserve.models.errors import CheckpointError, ConvertError
from meshserve.models.gguf_import import unpermute_rope_rows
from meshserve.models.decoder import forward
from tests.helpers import _llamacpp_permute, make_hf_model, write_gguf, write_unsupported_gguf

# Row length 256 so the K-quants (256-wide blocks) apply to every matrix.
GGUF_SHAPE = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                  rope_scaling=None)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return make_hf_model("llama", tmp_path_factory.mktemp("hf"), seed=3, **GGUF_SHAPE)


def _transformers_from_gguf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                dtype=torch.float32).eval()


def _compare(ckpt_dir, reference):
    ckpt = load_checkpoint(ckpt_dir, progress=False)
    ids = np.random.default_rng(0).integers(0, ckpt.config.vocab_size, (1, 24))
    logits, _ = jax.jit(forward, static_argnames="config")(
        ckpt.params, jnp.asarray(ids), jnp.arange(24)[None], config=ckpt.config)
    with torch.no_grad():
        ref = reference(torch.tensor(ids)).logits.numpy()
    err = np.abs(np.asarray(logits) - ref).max() / np.abs(ref).max()
    assert err <= 1e-4, err
    return ckpt


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q2_K, Q.Q3_K,
                                   Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.IQ4_NL, Q.IQ4_XS], ids=lambda q: q.name)
def test_tensor_type_matches_transformers(tmp_path, tiny_llama, qtype):
    path = tmp_path / f"tiny-{qtype.name}.gguf"
    write_gguf(path, tiny_llama, qtype)
    out = convert(f"gguf:{path}", tmp_path / "ckpt", progress=False)
    ckpt = _compare(out, _transformers_from_gguf(path))
    assert ckpt.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}]) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_qwen2_gguf_with_biases_matches_transformers(tmp_path):
    model = make_hf_model("qwen2", tmp_path / "hf", seed=4, **GGUF_SHAPE)
    path = tmp_path / "tiny-qwen2.gguf"
    write_gguf(path, model, Q.Q8_0, arch="qwen2")
    ckpt = _compare(convert(f"gguf:{path}", tmp_path / "ckpt", progress=False), _transformers_from_gguf(path))
    assert ckpt.config.attention_bias and ckpt.config.tie_word_embeddings


def test_q5_k_tensor_equals_the_gguf_packages_dequantization(tmp_path, tiny_llama):
    from gguf import GGUFReader
    from gguf.quants import dequantize

    from meshserve.models.gguf_import import GGUFSource

    path = tmp_path / "tiny-Q5_K.gguf"
    write_gguf(path, tiny_llama, Q.Q5_K)
    raw = {t.name: t for t in GGUFReader(path).tensors}["blk.1.ffn_down.weight"]
    assert raw.tensor_type == Q.Q5_K
    expected = dequantize(raw.data, Q.Q5_K)
    assert expected.shape == (256, 512) and np.abs(expected).max() > 0
    np.testing.assert_array_equal(GGUFSource(path).get("down", 1), expected)


def test_llama31_rope_freqs_match_transformers(tmp_path):
    """Llama 3.1/3.2 GGUF files carry their RoPE scaling as rope_freqs.weight (a divisor per frequency,
    as llama.cpp's converter writes it): logits equal transformers' (its rope_scaling) within 1e-4,
    at positions past the original context where the scaling matters."""
    rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
    model = make_hf_model("llama", tmp_path / "hf", seed=5, **{**GGUF_SHAPE, "rope_scaling": rope,
                                                                "num_attention_heads": 2, "num_key_value_heads": 1})
    path = tmp_path / "llama31.gguf"
    write_gguf(path, model, Q.F32, rope_freqs=True)
    ckpt = load_checkpoint(convert(f"gguf:{path}", tmp_path / "ckpt", progress=False), progress=False)
    factors = np.asarray(ckpt.config.rope_freq_factors)
    assert factors.shape == (64,) and factors.min() == 1.0 and factors.max() == 8.0  # all three bands
    ids = np.random.default_rng(1).integers(0, ckpt.config.vocab_size, (1, 200))
    logits, _ = jax.jit(forward, static_argnames="config")(
        ckpt.params, jnp.asarray(ids), jnp.arange(200)[None], config=ckpt.config)
    with torch.no_grad():
        ref = model(torch.tensor(ids)).logits.numpy()  # the HF model, scaled by its rope_scaling
    err = np.abs(np.asarray(logits) - ref).max() / np.abs(ref).max()
    assert err <= 1e-4, err
    unscaled = load_checkpoint(convert(f"gguf:{_without_rope_freqs(tmp_path, model)}", tmp_path / "plain",
                                       progress=False), progress=False)
    plain, _ = jax.jit(forward, static_argnames="config")(
        unscaled.params, jnp.asarray(ids), jnp.arange(200)[None], config=unscaled.config)
    assert np.abs(np.asarray(plain) - ref).max() / np.abs(ref).max() > 1e-3  # the factors do matter


def _without_rope_freqs(tmp_path, model):
    path = tmp_path / "plain.gguf"
    write_gguf(path, model, Q.F32)
    return path


def test_unpermute_inverts_llamacpp_permutation():
    w = np.random.default_rng(0).standard_normal((3 * 8, 5)).astype(np.float32)
    permuted = _llamacpp_permute(w, 3)
    assert not np.array_equal(permuted, w)
    np.testing.assert_array_equal(unpermute_rope_rows(permuted, 3), w)
    # within a head, rows (0, 2, 4, 6 | 1, 3, 5, 7) of the llama.cpp layout are the first half
    np.testing.assert_array_equal(permuted[0:8:2], w[0:4])


# ---- bad input: one clear error, and no checkpoint folder left behind -------------------------

def _assert_no_partial(folder):
    assert not any(p.name.startswith(".") for p in folder.iterdir()), list(folder.iterdir())


def test_missing_file(tmp_path):
    with pytest.raises(ConvertError, match="does not exist"):
        convert(f"gguf:{tmp_path / 'nope.gguf'}", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_truncated_file(tmp_path, tiny_llama):
    full = tmp_path / "full.gguf"
    write_gguf(full, tiny_llama, Q.Q8_0)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size * 2 // 3])
    with pytest.raises(ConvertError, match="truncated"):
        convert(f"gguf:{cut}", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    _assert_no_partial(tmp_path)


def test_header_only_file(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF\x03\x00\x00\x00")
    with pytest.raises(ConvertError, match="not a readable GGUF"):
        convert(f"gguf:{junk}", tmp_path / "out", progress=False)


def test_unsupported_architecture(tmp_path):
    import gguf

    path = tmp_path / "phi.gguf"
    w = gguf.GGUFWriter(str(path), "phi3")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with pytest.raises(ConvertError, match="unsupported architecture 'phi3'"):
        convert(f"gguf:{path}", tmp_path / "out", progress=False)


def test_unsupported_tensor_type(tmp_path):
    """A type the gguf package cannot dequantize (Q8_1: llama.cpp's activation format) is one error
    naming the tensor and its type, on convert and on `meshserve serve`."""
    import subprocess
    import sys

    path = tmp_path / "q8_1.gguf"
    write_unsupported_gguf(path)
    with pytest.raises(ConvertError, match="tensor token_embd.weight has unsupported type Q8_1; supported: F32, "):
        convert(f"gguf:{path}", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    run = subprocess.run([sys.executable, "-m", "meshserve.serving.cli", "serve", str(path), "--quiet"],
                         capture_output=True, text=True, timeout=120, env={**os.environ, "MESHSERVE_CACHE": str(tmp_path)})
    assert run.returncode == 1
    [line] = run.stderr.strip().splitlines()
    assert line.startswith(
        "meshserve: error: tensor token_embd.weight has unsupported type Q8_1; supported: F32, F16, BF16, Q4_0")


def test_existing_output_folder(tmp_path, tiny_llama):
    path = tmp_path / "ok.gguf"
    write_gguf(path, tiny_llama, Q.F32)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="already exists"):
        convert(f"gguf:{path}", tmp_path / "out", progress=False)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


def test_failure_while_writing_leaves_nothing(tmp_path, tiny_llama, monkeypatch):
    import orbax.checkpoint as ocp

    path = tmp_path / "ok.gguf"
    write_gguf(path, tiny_llama, Q.F32)

    def interrupted(self, directory, *args, **kwargs):
        (directory / "half-written").mkdir(parents=True)
        raise KeyboardInterrupt

    monkeypatch.setattr(ocp.PyTreeCheckpointer, "save", interrupted)
    out_parent = tmp_path / "ckpts"
    with pytest.raises(KeyboardInterrupt):
        convert(f"gguf:{path}", out_parent / "out", progress=False)
    assert list(out_parent.iterdir()) == []


def test_sentencepiece_vocabulary_rebuilds_its_merges():
    """A GGUF "llama" vocabulary holds tokens and scores but no merges: the rebuilt BPE must split
    text exactly as the BPE the vocabulary was trained with."""
    from tokenizers import SentencePieceBPETokenizer

    from meshserve.models.gguf_import import _sentencepiece_bpe

    corpus = ["The quick brown fox jumps over the lazy dog.", "Pack my box with five dozen jugs!",
              "hello world, hello there, the theory of everything", "numbers 12345 and more"] * 20
    trained = SentencePieceBPETokenizer(add_prefix_space=True)
    trained.train_from_iterator(corpus, vocab_size=300, min_frequency=2,
                                special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    vocab = trained.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    scores = [-float(i) for i in range(len(tokens))]  # merged tokens get ids in merge order
    rebuilt = _sentencepiece_bpe(tokens, scores, add_space_prefix=True)
    for text in ["the theory of the lazy fox", "hello there", "Pack five jugs, 12345!", "everything"]:
        assert rebuilt.encode(text).ids == trained.encode(text).ids, text
        assert rebuilt.decode(rebuilt.encode(text).ids) == text


@pytest.mark.parametrize("qtype,fmt", [(Q.Q8_0, "q8_0"), (Q.Q4_0, "int4-g32"), (Q.Q4_1, "q4_1"), (Q.Q4_K, "q4_1"),
                                      (Q.Q6_K, "int8-g16")], ids=["Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K"])
def test_blocks_kept_quantized_dequantize_to_the_gguf_packages_values(tmp_path, tiny_llama, qtype, fmt):
    """`convert --quantize` with the file's own format keeps its blocks as stored (the bytes are the
    file's), and each weight dequantized inside a program equals the gguf package's dequantization
    exactly; the quantized checkpoint's logits equal the float32 checkpoint's (converted from the
    same file) within 1e-5."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    from meshserve.models import quant
    from meshserve.models.decoder import quantized_geometries

    path = tmp_path / f"tiny-{qtype.name}.gguf"
    write_gguf(path, tiny_llama, qtype)
    ckpt = load_checkpoint(convert(f"gguf:{path}", tmp_path / "q", quantize=fmt, progress=False), progress=False)
    assert ckpt.config.quantization == fmt
    raw = {t.name: t for t in GGUFReader(path).tensors}
    geometries = quantized_geometries(ckpt.config)
    down = ckpt.params["layers"][1]["mlp"]["down_proj"]
    assert np.asarray(down["q"]).tobytes() != b"" and down["q"].dtype == (jnp.int8 if fmt in ("q8_0", "int8-g16") else jnp.uint8)
    for name, path_ in (("blk.1.ffn_down.weight", (1, "mlp", "down_proj")),
                        ("blk.0.attn_output.weight", (0, "attn", "o_proj")),
                        ("blk.0.attn_v.weight", (0, "attn", "v_proj"))):
        layer, block, weight = path_
        parts = ckpt.params["layers"][layer][block][weight]
        g = geometries[("layers", layer, block, weight)]
        got = np.asarray(jax.jit(lambda p: quant.dequantize(p, g))(parts))
        expected = dequantize(raw[name].data, qtype)  # [out, in]
        np.testing.assert_array_equal(got.reshape(-1, expected.shape[0]).T, expected)
        if weight != "o_proj" and qtype not in (Q.Q4_K, Q.Q6_K):  # ([in, out] as stored here: the file's
            # value bytes, transposed; K-quants' are unpacked into another layout)
            offset, block_bytes = {"q8_0": (2, 34), "int4-g32": (2, 18), "q4_1": (4, 20)}[fmt]
            stored = np.asarray(raw[name].data).reshape(expected.shape[0], -1, block_bytes)[..., offset:]
            held = np.asarray(parts["q"]).reshape(-1, expected.shape[0]).T
            assert held.tobytes() == np.ascontiguousarray(stored.reshape(expected.shape[0], -1)).tobytes()
    float_ckpt = load_checkpoint(convert(f"gguf:{path}", tmp_path / "f32", progress=False), progress=False)
    ids = jnp.asarray(np.random.default_rng(1).integers(0, ckpt.config.vocab_size, (1, 12)))
    run = jax.jit(forward, static_argnames="config")
    got, _ = run(ckpt.params, ids, jnp.arange(12)[None], config=ckpt.config)
    want, _ = run(float_ckpt.params, ids, jnp.arange(12)[None], config=float_ckpt.config)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-5)
