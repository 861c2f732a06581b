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
