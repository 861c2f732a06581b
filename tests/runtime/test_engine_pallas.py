"""The engine with `attention: pallas` (the kernels interpreted on CPU) gives the reference path's
greedy tokens, on the default model and on a sliding-window model."""

import dataclasses

import pytest

from meshserve.runtime.engine import Engine, EngineConfig
from meshserve.runtime.sampling import SamplingParams

SMALL = dict(max_seq_len=128, max_num_seqs=2, max_num_batched_tokens=32, max_prefill_chunk=32,
             decode_buckets=(2,), prefill_buckets=(32,), context_buckets=(8,), page_size=16)


def _greedy(ckpt, prompts, attention, n=12, **config):
    engine = Engine(ckpt, EngineConfig(attention=attention, **{**SMALL, **config}))
    assert engine.attention == attention
    out = engine.generate(prompts, SamplingParams(max_tokens=n, ignore_eos=True))
    return [list(c.token_ids) for c in out]


def test_default_model_pallas_equals_reference(smollm_ckpt):
    tok = smollm_ckpt.tokenizer
    prompts = [tok.encode_chat([{"role": "user", "content": "What is the capital of France?"}]),
               tok.encode("Once upon a time, in a land far")]  # > 32 tokens: a chunk with an offset
    assert _greedy(smollm_ckpt, prompts, "pallas") == _greedy(smollm_ckpt, prompts, "reference")


def test_sliding_window_pallas_equals_reference(tiny_ckpt):
    ckpt = dataclasses.replace(tiny_ckpt, config=dataclasses.replace(tiny_ckpt.config, sliding_window=7))
    prompts = [list(range(3, 40)), [5, 6, 7]]
    assert _greedy(ckpt, prompts, "pallas", n=20, page_size=4, context_buckets=(32,)) == \
        _greedy(ckpt, prompts, "reference", n=20, page_size=4, context_buckets=(32,))


def test_unknown_attention_is_refused():
    from meshserve.models.errors import ConfigError

    with pytest.raises(ConfigError, match="attention must be one of reference, pallas"):
        EngineConfig(attention="flash")


def test_speculative_verify_steps_with_pallas_equal_reference(tiny_ckpt, monkeypatch):
    """Verify steps feed 1 + k tokens a row through the Pallas kernel (a sliding window too): drafts
    whose third token is wrong (two accepted, then the correction) give the reference's tokens."""
    from meshserve.runtime.speculative import SpeculativeConfig

    ckpt = dataclasses.replace(tiny_ckpt, config=dataclasses.replace(tiny_ckpt.config, sliding_window=7))
    prompts = [list(range(3, 40)), [5, 6, 7]]
    ref = _greedy(ckpt, prompts, "reference", n=20, page_size=4, context_buckets=(32,))
    engine = Engine(ckpt, EngineConfig(attention="pallas", **{**SMALL, "page_size": 4, "context_buckets": (32,)},
                                       speculative=SpeculativeConfig(num_speculative_tokens=3)))
    by_prompt = {tuple(p): r for p, r in zip(prompts, ref)}

    def propose(seq, room):
        done = len(seq.tokens) - seq.prompt_len
        draft = list(by_prompt[tuple(seq.tokens[:seq.prompt_len])][done:done + min(3, room)])
        if len(draft) == 3:
            draft[2] = (draft[2] + 1) % 300
        return tuple(draft)

    monkeypatch.setattr(engine.speculator, "propose", propose)
    out = engine.generate(prompts, SamplingParams(max_tokens=20, ignore_eos=True))
    assert [list(c.token_ids) for c in out] == ref
    assert engine.speculator.num_accepted_tokens >= 10
