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
