"""The tokenizer built from GGUF metadata against transformers' reading of the same file."""

import pytest

from meshserve.models.tokenizer import IncrementalDecoder

TEXTS = [
    "What is the capital of France?",
    "Hello world 12345 it's   spaced\n\nnew\tlines",
    "héllo wörld — naïve café, 世界 🙂🚀",
    "<|im_start|>user\nhi<|im_end|>\n",
    "def f(x):\n    return x**2  # 3.14159",
    " leading space and trailing ",
]


@pytest.fixture(scope="module")
def hf_tokenizer(smollm_gguf):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm_gguf.parent, gguf_file=smollm_gguf.name)


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_transformers(smollm_ckpt, hf_tokenizer, text):
    ours = smollm_ckpt.tokenizer
    assert ours.encode(text) == hf_tokenizer.encode(text, add_special_tokens=False)
    assert ours.decode(ours.encode(text)) == text.replace("<|im_start|>", "").replace("<|im_end|>", "")


def test_special_tokens(smollm_ckpt):
    tok = smollm_ckpt.tokenizer
    assert tok.encode("<|im_start|>") == [1] and tok.bos_id == 1
    assert tok.eos_ids == (2,)
    assert tok.config.add_bos_token is False


def test_tokenizer_config_has_the_standard_keys(smollm_ckpt):
    """Tools that read a checkpoint's tokenizer_config.json (transformers, lm-eval) look for
    `bos_token` and `eos_token`; meshserve keeps every stop id in `eos_tokens`."""
    import json

    from meshserve.models.tokenizer import TokenizerConfig

    data = json.loads((smollm_ckpt.path / "tokenizer_config.json").read_text())
    assert data["bos_token"] == "<|im_start|>" and data["eos_token"] == "<|im_end|>"
    assert data["eos_tokens"] == ["<|im_end|>"]
    only_standard = json.dumps({"bos_token": "<s>", "eos_token": "</s>", "chat_template": None})
    assert TokenizerConfig.from_json(only_standard).eos_tokens == ("</s>",)


def test_chat_template_matches_transformers(smollm_ckpt, hf_tokenizer):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What is the capital of France?"},
                {"role": "assistant", "content": "Paris."},
                {"role": "user", "content": "And of Italy?"}]
    for msgs in (messages[1:2], messages):
        ref = hf_tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        assert smollm_ckpt.tokenizer.apply_chat_template(msgs) == ref
        assert smollm_ckpt.tokenizer.encode_chat(msgs) == hf_tokenizer.apply_chat_template(
            msgs, tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]


@pytest.mark.parametrize("text", TEXTS[1:3])
def test_incremental_decoder_is_utf8_safe(smollm_ckpt, text):
    tok = smollm_ckpt.tokenizer
    ids = tok.encode(text)
    dec = IncrementalDecoder(tok)
    deltas = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(deltas) == tok.decode(ids)
    assert not any("\ufffd" in d for d in deltas)


def _split_character(tok) -> str:
    """A character whose UTF-8 bytes span several tokens of this vocabulary."""
    for ch in "🦜𝔘ꙮ🜲𓀀世界":
        if len(tok.encode(ch)) > 1 and "\ufffd" in tok.decode(tok.encode(ch)[:1]):
            return ch
    raise AssertionError("no multi-token character found")


def test_incremental_decoder_holds_back_partial_characters(smollm_ckpt):
    tok = smollm_ckpt.tokenizer
    ch = _split_character(tok)
    ids = tok.encode(f"a{ch}b")
    dec = IncrementalDecoder(tok)
    deltas = [dec.push(i) for i in ids]
    assert "" in deltas  # held back while the character was incomplete
    assert "".join(deltas) + dec.flush() == f"a{ch}b"
    assert not any("\ufffd" in d for d in deltas)


def test_incremental_decoder_flushes_a_broken_tail(smollm_ckpt):
    tok = smollm_ckpt.tokenizer
    ids = tok.encode("ok " + _split_character(tok))
    dec = IncrementalDecoder(tok)
    out = "".join(dec.push(i) for i in ids[:-1])
    assert "\ufffd" not in out and out.startswith("ok")
    assert dec.flush().endswith("\ufffd")  # the stream ended mid-character: shown, not lost


def test_incremental_decoder_native_stream_and_python_windows_agree(smollm_ckpt, monkeypatch):
    """The same deltas, token by token, from tokenizers' DecodeStream and from the Python windows."""
    from meshserve.models import tokenizer as module

    tok = smollm_ckpt.tokenizer
    ids = tok.encode(" ".join(TEXTS) + f" a{_split_character(tok)}b  tail") + tok.encode(_split_character(tok))[:1]

    def deltas():
        dec = IncrementalDecoder(tok)
        return [dec.push(i) for i in ids] + [dec.flush()]

    native = deltas()
    monkeypatch.setattr(module, "_DecodeStream", None)
    assert deltas() == native
    assert "".join(native) == tok.decode(ids)
