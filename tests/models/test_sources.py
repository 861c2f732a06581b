"""`meshserve serve MODEL`'s sources: what a path is, the content key its conversion is cached under,
`--dtype auto`, and conversion once."""

import json
import shutil

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from meshserve.models import sources
from meshserve.models.checkpoint import read_meta
from meshserve.models.errors import ConvertError
from meshserve.models.sources import content_key, resolve_model
from tests.helpers import make_hf_model, write_gguf


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("src") / "tiny-llama"
    make_hf_model("llama", folder, seed=7)
    return folder


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MESHSERVE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_content_key_follows_content_not_place(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "HEAD_BYTES", 1024)  # small pieces, so a small file has all three parts
    monkeypatch.setattr(sources, "PIECE_BYTES", 64)
    data = np.random.default_rng(0).integers(0, 256, 100_000, dtype=np.uint8).tobytes()
    a = tmp_path / "a" / "m.gguf"
    b = tmp_path / "b" / "m.gguf"
    for p in (a, b):
        p.parent.mkdir()
        p.write_bytes(data)
    assert content_key([a]) == content_key([b])  # moved or copied: the same conversion
    step = (len(data) - 1024) // 16
    for where in (0, 1024 + 3 * step + 10):  # the head, and a sampled piece
        changed = bytearray(data)
        changed[where] ^= 1
        b.write_bytes(bytes(changed))
        assert content_key([a]) != content_key([b])
    b.write_bytes(data + b"x")  # the size
    assert content_key([a]) != content_key([b])


def test_what_a_path_is(tmp_path, hf_folder, tiny_ckpt_dir):
    assert sources._kind(hf_folder) == "hf"
    assert sources._kind(tiny_ckpt_dir) == "checkpoint"
    with pytest.raises(ConvertError, match="does not exist"):
        sources._kind(tmp_path / "absent")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ConvertError, match="is not a GGUF file"):
        sources._kind(tmp_path / "notes.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConvertError, match="neither config.json"):
        sources._kind(tmp_path / "empty")


def test_hf_folder_converted_once_then_reused(cache, hf_folder, capsys):
    first = resolve_model(str(hf_folder))
    assert "converting (hf) to float32" in capsys.readouterr().err
    assert first.parent == cache / "checkpoints" and first.name.startswith("tiny-llama-")
    assert read_meta(first)[2] == np.float32  # a float32 source stays float32 under auto
    mtime = (first / "meshserve.json").stat().st_mtime_ns
    again = resolve_model(str(hf_folder))
    assert again == first and (first / "meshserve.json").stat().st_mtime_ns == mtime
    assert "converted before" in capsys.readouterr().err
    assert resolve_model(str(first)) == first  # the checkpoint itself
    with pytest.raises(ConvertError, match="holds float32, not bfloat16"):
        resolve_model(str(first), "bfloat16")
    assert read_meta(resolve_model(str(hf_folder), "bfloat16"))[2].name == "bfloat16"


def test_auto_keeps_bfloat16(cache, hf_folder, tmp_path):
    bf16 = tmp_path / "bf16"
    shutil.copytree(hf_folder, bf16)
    config = json.loads((bf16 / "config.json").read_text())
    config["dtype"] = "bfloat16"
    (bf16 / "config.json").write_text(json.dumps(config))
    assert read_meta(resolve_model(str(bf16), progress=False))[2].name == "bfloat16"


def test_gguf_dtype_auto(cache, tmp_path, hf_folder):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_folder)
    write_gguf(tmp_path / "f32.gguf", model, Q.F32)
    write_gguf(tmp_path / "q8.gguf", model, Q.Q8_0)
    assert sources.source_dtype("gguf", tmp_path / "f32.gguf") == "float32"
    assert sources.source_dtype("gguf", tmp_path / "q8.gguf") == "bfloat16"  # quantized blocks: half of float32
    out = resolve_model(str(tmp_path / "q8.gguf"), progress=False)
    assert out.name.startswith("q8-") and out.name.endswith("-bfloat16")
    from meshserve.models.convert import convert  # `meshserve convert` defaults to auto too

    assert read_meta(convert(f"gguf:{tmp_path / 'f32.gguf'}", tmp_path / "c", "auto", progress=False))[2] == np.float32


def test_bad_dtype(cache):
    with pytest.raises(ConvertError, match="--dtype must be one of auto, float32, bfloat16"):
        resolve_model(None, "float16")
