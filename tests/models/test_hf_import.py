"""HF import: bad folders get one clear error and leave no checkpoint behind."""

import json

import pytest

from meshserve.models.convert import convert, open_source
from meshserve.models.errors import ConvertError
from tests.helpers import make_hf_model


@pytest.fixture(scope="module")
def sharded_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf") / "model"
    make_hf_model("llama", folder, max_shard_size="60KB")
    return folder


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def _fails(spec, out, match):
    with pytest.raises(ConvertError, match=match):
        convert(spec, out, progress=False)
    assert not out.exists()


def test_missing_folder(tmp_path):
    _fails(f"hf:{tmp_path / 'none'}", tmp_path / "out", "does not exist")


def test_missing_shard(tmp_path, sharded_folder):
    folder = _copy(sharded_folder, tmp_path / "m")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    (folder / victim).unlink()
    _fails(f"hf:{folder}", tmp_path / "out", f"missing shard.*{victim}")


def test_truncated_shard(tmp_path, sharded_folder):
    folder = _copy(sharded_folder, tmp_path / "m")
    shard = sorted(folder.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-100])
    _fails(f"hf:{folder}", tmp_path / "out", "truncated")


def test_unsupported_model_type(tmp_path, sharded_folder):
    folder = _copy(sharded_folder, tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "gpt_neox"
    (folder / "config.json").write_text(json.dumps(config))
    _fails(f"hf:{folder}", tmp_path / "out", "unsupported model_type 'gpt_neox'")


def test_missing_config_and_tokenizer(tmp_path, sharded_folder):
    folder = _copy(sharded_folder, tmp_path / "m")
    (folder / "tokenizer.json").unlink()
    _fails(f"hf:{folder}", tmp_path / "out", "no tokenizer.json")
    (folder / "config.json").unlink()
    _fails(f"hf:{folder}", tmp_path / "out", "no config.json")


def test_bad_source_spec(tmp_path):
    for spec in ("model.gguf", "onnx:model", "hf:"):
        with pytest.raises(ConvertError, match="--from must be gguf:FILE or hf:DIR"):
            open_source(spec)


@pytest.fixture(scope="module")
def moe_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf") / "moe"
    make_hf_model("qwen3_moe", folder)  # saved per expert, as published checkpoints are
    return folder


def _tensors(folder) -> dict:
    from safetensors.numpy import load_file

    return load_file(str(folder / "model.safetensors"))


def _save(state: dict, path) -> None:
    from safetensors.numpy import save_file

    save_file({k: v.copy() for k, v in state.items()}, str(path), metadata={"format": "pt"})


def _edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def test_experts_disagreeing_with_the_config_name_the_tensor(tmp_path, moe_folder):
    """More experts in the config than the checkpoint holds, fewer, a top-k the experts cannot give,
    and an expert width the tensors do not have: each one line naming the tensor (or field)."""
    more = _copy(moe_folder, tmp_path / "more")
    _edit_config(more, num_experts=16)
    _fails(f"hf:{more}", tmp_path / "a", r"tensor model\.layers\.0\.mlp\.gate\.weight has shape \(8, 64\), "
                                        r"expected \(16, 64\) from the config")  # the router, read first
    fewer = _copy(moe_folder, tmp_path / "fewer")
    _edit_config(fewer, num_experts=4)
    (fewer / "model.safetensors").unlink()  # a router of 4 experts, but 8 experts' tensors
    state = {k: v for k, v in _tensors(moe_folder).items()}
    for layer in (0, 1):
        state[f"model.layers.{layer}.mlp.gate.weight"] = state[f"model.layers.{layer}.mlp.gate.weight"][:4]
    _save(state, fewer / "model.safetensors")
    _fails(f"hf:{fewer}", tmp_path / "b", r"model\.layers\.0\.mlp\.experts\.E\.gate_proj\.weight holds 8 experts, "
                                         r"the config says 4")
    top = _copy(moe_folder, tmp_path / "top")
    _edit_config(top, num_experts_per_tok=9)
    _fails(f"hf:{top}", tmp_path / "c", r"num_experts_per_tok \(9\) exceeds num_experts \(8\)")
    wide = _copy(moe_folder, tmp_path / "wide")
    _edit_config(wide, moe_intermediate_size=64)
    _fails(f"hf:{wide}", tmp_path / "d", r"tensor model\.layers\.0\.mlp\.experts\.E\.gate_proj\.weight has shape "
                                        r"\(8, 32, 64\), expected \(8, 64, 64\) from the config")


# ---- fp8 checkpoints with 128×128 block scales (DeepSeek's and Qwen's) ---------------------------------

FP8_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def fp8_folder(tmp_path_factory):
    """A Qwen3 model (head_dim 128) saved as an fp8 checkpoint: every linear weight in e4m3 with one
    float32 weight_scale_inv per 128×128 block (max |w| of the block / 448), as published ones are.
    Returns the folder and the dequantized weights, by tensor name."""
    import torch
    from safetensors.torch import load_file, save_file

    folder = tmp_path_factory.mktemp("hf") / "fp8"
    make_hf_model("qwen3", folder, hidden_size=256, intermediate_size=384, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=128, num_hidden_layers=1)
    state, dequantized = load_file(str(folder / "model.safetensors")), {}
    for name in [n for n in state if n.split(".")[-2] in FP8_LINEARS]:
        w = state[name].float()
        blocks = w.reshape(w.shape[0] // 128, 128, w.shape[1] // 128, 128)
        scale = blocks.abs().amax(dim=(1, 3)) / 448
        q = (blocks / scale[:, None, :, None]).reshape(w.shape).to(torch.float8_e4m3fn)
        state[name], state[name + "_scale_inv"] = q, scale
        dequantized[name] = (q.float().reshape(blocks.shape) * scale[:, None, :, None]).reshape(w.shape).numpy()
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    _edit_config(folder, quantization_config={"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                              "weight_block_size": [128, 128]})
    return folder, dequantized


def test_an_fp8_block_checkpoint_is_dequantized_or_kept_as_stored(tmp_path, fp8_folder):
    """Without --quantize each fp8 weight is q · weight_scale_inv exactly; with fp8-block its codes and
    block scales are the file's, and the model computes what the dequantized one does."""
    import jax.numpy as jnp
    import numpy as np

    from meshserve.models import decoder, quant
    from meshserve.models.checkpoint import load_checkpoint

    folder, dequantized = fp8_folder
    plain = load_checkpoint(convert(f"hf:{folder}", tmp_path / "f32", progress=False), progress=False)
    kept = load_checkpoint(convert(f"hf:{folder}", tmp_path / "fp8", quantize="fp8-block", progress=False),
                           progress=False)
    attn, mlp = plain.params["layers"][0]["attn"], plain.params["layers"][0]["mlp"]
    np.testing.assert_array_equal(np.asarray(mlp["down_proj"]), dequantized["model.layers.0.mlp.down_proj.weight"].T)
    np.testing.assert_array_equal(np.asarray(attn["q_proj"]).reshape(256, 256),
                                  dequantized["model.layers.0.self_attn.q_proj.weight"].T)
    assert kept.config.quantization == "fp8-block"
    geometries = decoder.quantized_geometries(kept.config)
    for path, geometry in geometries.items():
        parts = kept.params
        for key in path:
            parts = parts[key]
        float_weight = plain.params
        for key in path:
            float_weight = float_weight[key]
        assert parts["q"].dtype == jnp.float8_e4m3fn
        np.testing.assert_array_equal(np.asarray(quant.dequantize(parts, geometry)), np.asarray(float_weight))
    ids = jnp.asarray([[3, 17, 40, 9, 120]])
    positions = jnp.arange(5)[None]
    want = decoder.forward(plain.params, ids, positions, config=plain.config)[0]
    got = decoder.forward(kept.params, ids, positions, config=kept.config)[0]
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-5 * float(jnp.abs(want).max()))
    # taken as stored, not quantized again: the file's codes and block scales, transposed to [in, out]
    from meshserve.models.hf_import import SafetensorsFile

    stored = SafetensorsFile(folder / "model.safetensors")
    down = kept.params["layers"][0]["mlp"]["down_proj"]
    np.testing.assert_array_equal(np.asarray(down["q"]).view(np.uint8),
                                  stored.get("model.layers.0.mlp.down_proj.weight").view(np.uint8).T)
    np.testing.assert_array_equal(np.asarray(down["scale"]),
                                  stored.get("model.layers.0.mlp.down_proj.weight_scale_inv").T)


def test_an_fp8_weight_without_its_scales_is_named(tmp_path, fp8_folder):
    from safetensors.torch import load_file, save_file

    folder = _copy(fp8_folder[0], tmp_path / "no-scale")
    state = load_file(str(folder / "model.safetensors"))
    del state["model.layers.0.mlp.up_proj.weight_scale_inv"]
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    _fails(f"hf:{folder}", tmp_path / "out", "model.layers.0.mlp.up_proj.weight is fp8, but the checkpoint has no "
           "model.layers.0.mlp.up_proj.weight_scale_inv")
