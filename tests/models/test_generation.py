"""Sampling defaults: read from a generation_config.json as transformers reads it, from a GGUF file's
general.sampling.* keys or its family, kept in a checkpoint, and checked."""

import json

import numpy as np
import pytest

from meshserve.models import generation
from meshserve.models.errors import ConfigError, ConvertError


@pytest.mark.parametrize("config,defaults", [
    ({}, {"temperature": 0.0}),  # transformers' default: do_sample false, greedy
    ({"bos_token_id": 1, "eos_token_id": 2}, {"temperature": 0.0}),  # SmolLM2-Instruct's file
    ({"do_sample": False, "temperature": 0.6, "repetition_penalty": 1.1},
     {"temperature": 0.0, "repetition_penalty": 1.1}),
    ({"do_sample": True, "temperature": 0.6, "top_p": 0.9}, {"temperature": 0.6, "top_p": 0.9}),  # Llama 3
    ({"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05},
     {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}),  # Qwen2.5
    ({"do_sample": True}, {}),  # sampling with the API's own defaults
])
def test_hf_generation_config(config, defaults):
    assert generation.from_hf(config) == defaults


def test_gguf_sampling_keys_win_over_the_family():
    keys = {"general.sampling.temp": 0.3, "general.sampling.top_k": 40, "general.sampling.min_p": None}
    assert generation.from_gguf(keys, "smollm2", "x.gguf") == {"temperature": 0.3, "top_k": 40}
    assert generation.from_gguf({}, "SmolLM2", "x.gguf") == {"temperature": 0.0}
    assert generation.from_gguf({}, "llama-3.1", "x.gguf") == {"temperature": 0.6, "top_p": 0.9}
    assert generation.from_gguf({}, "something-else", "x.gguf") == {}
    assert generation.from_gguf({}, None, "x.gguf") == {}


@pytest.mark.parametrize("defaults,message", [
    ({"temperature": float("nan")}, "temperature must be a finite number"),
    ({"temperature": "hot"}, "temperature must be a finite number"),
    ({"top_k": 2.5}, "top_k must be an integer"),
    ({"max_tokens": 5}, "'max_tokens' is not a sampling default"),
    ({"top_p": True}, "top_p must be a finite number"),
])
def test_bad_defaults_name_the_field(defaults, message):
    with pytest.raises(ConvertError, match=message):
        generation.check(defaults, "somewhere")
    with pytest.raises(ConfigError, match=message):
        generation.check(defaults, "somewhere", ConfigError)


def test_top_k_off_is_zero():
    assert generation.check({"top_k": -1}, "x") == {"top_k": 0}


@pytest.mark.parametrize("defaults", [{"temperature": 0.0}, {"temperature": 0.6, "top_p": 0.9},
                                      {"temperature": 0.0, "repetition_penalty": 1.1}, {"top_k": 20}])
def test_saved_and_loaded_unchanged_in_transformers_shape(tmp_path, defaults):
    generation.save(tmp_path, defaults)
    assert generation.load(tmp_path) == defaults
    written = json.loads((tmp_path / generation.FILE).read_text())
    assert written["do_sample"] is (defaults.get("temperature") != 0.0)
    from transformers import GenerationConfig  # transformers reads the file as the same request

    hf = GenerationConfig.from_pretrained(tmp_path)
    assert hf.do_sample is written["do_sample"]
    assert not list(tmp_path.glob(".*partial*"))


def test_no_defaults_no_file(tmp_path):
    generation.save(tmp_path, {})
    assert not (tmp_path / generation.FILE).exists()
    assert generation.load(tmp_path) == {}


def test_a_broken_file_is_named(tmp_path):
    (tmp_path / generation.FILE).write_text("{nope")
    with pytest.raises(ConvertError, match="generation_config.json is not valid JSON"):
        generation.load(tmp_path)


def test_hf_import_and_checkpoint_keep_them(tmp_path, tiny_ckpt):
    from meshserve.models.checkpoint import load_checkpoint, save_checkpoint
    from meshserve.models.convert import convert
    from tests.helpers import make_hf_model

    make_hf_model("llama", tmp_path / "hf", seed=1)
    (tmp_path / "hf" / generation.FILE).write_text(json.dumps({"do_sample": True, "temperature": 0.6, "top_p": 0.9}))
    ckpt = load_checkpoint(convert(f"hf:{tmp_path / 'hf'}", tmp_path / "ckpt", progress=False), progress=False)
    assert ckpt.generation == {"temperature": 0.6, "top_p": 0.9}
    plain = save_checkpoint(tmp_path / "plain", tiny_ckpt.config, tiny_ckpt.params, tiny_ckpt.tokenizer)
    assert load_checkpoint(plain, progress=False).generation == {}
    assert np.dtype(ckpt.dtype) == np.float32


def test_default_gguf_says_greedy(smollm_gguf):
    from meshserve.models.gguf_import import GGUFSource

    assert GGUFSource(smollm_gguf).generation == {"temperature": 0.0}
