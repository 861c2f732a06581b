"""Parity with Hugging Face transformers (PyTorch CPU, float32): the default model read from the same
GGUF file, and small random models of each supported family brought in through `convert --from hf:`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from meshserve.models.checkpoint import load_checkpoint
from meshserve.models.convert import convert
from meshserve.models.decoder import forward
from meshserve.runtime.engine import Engine, EngineConfig
from meshserve.runtime.sampling import SamplingParams
from tests.helpers import make_hf_model, write_gguf

_forward = jax.jit(forward, static_argnames="config")


def ours_logits(ckpt, ids: np.ndarray) -> np.ndarray:
    positions = jnp.arange(ids.shape[1], dtype=jnp.int32)[None]
    logits, _ = _forward(ckpt.params, jnp.asarray(ids, jnp.int32), positions, config=ckpt.config)
    return np.asarray(logits)


def ref_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.float().numpy()


def ref_greedy(model, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding by the reference's plain full forward pass, no cache, no EOS handling."""
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(ref_logits(model, np.array([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def engine_greedy(ckpt, prompts: list[list[int]], n: int, **config) -> list[list[int]]:
    """Greedy tokens from the engine (paged cache, compiled programs), all prompts at once."""
    settings = dict(max_seq_len=128, max_num_seqs=4, max_num_batched_tokens=64, max_prefill_chunk=64,
                    decode_buckets=(4,), prefill_buckets=(64,), context_buckets=(8,), page_size=16)
    settings.update(config)
    engine = Engine(ckpt, EngineConfig(**settings))
    out = engine.generate(prompts, SamplingParams(max_tokens=n, ignore_eos=True))
    return [list(c.token_ids) for c in out]


def assert_logits_close(ours, ref, rtol=1e-4):
    err = np.abs(ours - ref).max() / np.abs(ref).max()
    assert err <= rtol, f"max |Δlogit| / max |logit| = {err:.2e}"


@pytest.mark.parametrize("length", [1, 9, 64, 233])
def test_default_model_logits_match_transformers(smollm_ckpt, smollm_hf, length):
    ids = np.random.default_rng(length).integers(0, smollm_ckpt.config.vocab_size, (1, length))
    assert_logits_close(ours_logits(smollm_ckpt, ids), ref_logits(smollm_hf, ids))


def test_default_model_greedy_tokens_match_transformers(smollm_ckpt, smollm_hf):
    """Three chats at once through the engine, with a page pool too small for all of them (so one is
    preempted and recomputed) and prompts longer than one prefill chunk."""
    tok = smollm_ckpt.tokenizer
    prompts = [tok.encode_chat([{"role": "user", "content": q}]) for q in
               ("Tell me about the sea.", "What is the capital of France?",
                "List three facts about owls, and explain why each one matters to a forest.")]
    ours = engine_greedy(smollm_ckpt, prompts, 32, max_prefill_chunk=32, max_num_batched_tokens=32,
                         prefill_buckets=(32,), kv_cache_bytes=9 * 16 * 2 * 30 * 3 * 64 * 4)
    for prompt, tokens in zip(prompts, ours):
        assert tokens == ref_greedy(smollm_hf, prompt, 32)


@pytest.mark.parametrize("family,sharded", [("llama", False), ("mistral", True), ("qwen2", True)])
def test_random_hf_model_matches_transformers(tmp_path, family, sharded):
    model = make_hf_model(family, tmp_path / "hf", seed=1, max_shard_size="60KB" if sharded else None)
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists() == sharded
    ckpt = load_checkpoint(convert(f"hf:{tmp_path / 'hf'}", tmp_path / "ckpt", progress=False),
                           progress=False)
    c = ckpt.config
    assert c.architecture == family
    # the feature each family adds really reached the config
    assert {"llama": c.rope_scaling is not None and c.rope_scaling.factor == 8.0,
            "mistral": c.sliding_window == 8,
            "qwen2": c.attention_bias and c.tie_word_embeddings}[family]
    rng = np.random.default_rng(0)
    for length in (1, 5, 40):  # 40 > Mistral's sliding window of 8 here
        ids = rng.integers(0, ckpt.config.vocab_size, (1, length))
        assert_logits_close(ours_logits(ckpt, ids), ref_logits(model, ids))
    prompt = rng.integers(0, ckpt.config.vocab_size, 11).tolist()
    assert engine_greedy(ckpt, [prompt], 32)[0] == ref_greedy(model, prompt, 32)


# Qwen3 (q/k norm) and the mixtures of experts: hidden 64, 2 layers, 8 experts, top-2.
GGUF_ARCH = {"qwen3": "qwen3", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe", "mixtral": "llama"}


def write_fused_layout(model, folder):
    """The model's tensors as transformers 5 holds them (experts fused into 3-D gate_up_proj and
    down_proj), in place of the per-expert tensors save_pretrained writes."""
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    (folder / "model.safetensors").unlink()
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return state


def decode_logits(ckpt, ids: np.ndarray, prompt: int) -> np.ndarray:
    """Logits of positions prompt.. of `ids`, one token per call after a prefill of `prompt` tokens
    into a dense cache: the decode path, not the whole-sequence one."""
    from meshserve.models.decoder import DenseKVCache

    step = jax.jit(forward, static_argnames="config")
    cache = DenseKVCache.zeros(ckpt.config, 1, ids.shape[1])
    positions = jnp.arange(ids.shape[1], dtype=jnp.int32)[None]
    logits, cache = step(ckpt.params, jnp.asarray(ids[:, :prompt]), positions[:, :prompt], cache, config=ckpt.config)
    out = [np.asarray(logits)[:, -1]]
    for t in range(prompt, ids.shape[1] - 1):
        logits, cache = step(ckpt.params, jnp.asarray(ids[:, t:t + 1]), positions[:, t:t + 1], cache,
                             config=ckpt.config)
        out.append(np.asarray(logits)[:, -1])
    return np.stack(out, axis=1)  # the logits of positions prompt - 1 … len - 2


@pytest.mark.parametrize("family", list(GGUF_ARCH))
def test_qwen3_and_moe_families_match_transformers(tmp_path, family):
    """Prefill and decode logits, and 32 greedy tokens through the engine, from the per-expert
    safetensors layout of published checkpoints; logits from transformers 5's fused layout and from
    GGUF (stacked `ffn_*_exps` tensors, Q/K rows permuted for Mixtral's "llama")."""
    from gguf import GGMLQuantizationType as Q

    model = make_hf_model(family, tmp_path / "hf", seed=2)
    rng = np.random.default_rng(1)
    ids = rng.integers(0, model.config.vocab_size, (1, 24))
    ref = ref_logits(model, ids)
    ckpts = {"per-expert": convert(f"hf:{tmp_path / 'hf'}", tmp_path / "a", progress=False)}
    write_gguf(tmp_path / "m.gguf", model, Q.F32, arch=GGUF_ARCH[family])
    ckpts["gguf"] = convert(f"gguf:{tmp_path / 'm.gguf'}", tmp_path / "b", progress=False)
    if family != "qwen3":
        state = write_fused_layout(model, tmp_path / "hf")
        assert any(k.endswith("mlp.experts.gate_up_proj") for k in state)
        ckpts["fused"] = convert(f"hf:{tmp_path / 'hf'}", tmp_path / "c", progress=False)
    for layout, path in ckpts.items():
        ckpt = load_checkpoint(path, progress=False)
        c = ckpt.config
        assert c.architecture == family, layout
        assert (c.num_experts, c.num_experts_per_tok) == ((0, 0) if family == "qwen3" else (8, 2))
        assert c.qk_norm == family.startswith("qwen3")
        assert_logits_close(ours_logits(ckpt, ids), ref)
        assert_logits_close(decode_logits(ckpt, ids, 16), ref[:, 15:23])
    ckpt = load_checkpoint(ckpts["per-expert"], progress=False)
    prompt = rng.integers(0, c.vocab_size, 11).tolist()
    assert engine_greedy(ckpt, [prompt], 32)[0] == ref_greedy(model, prompt, 32)


def test_prompt_scores_match_transformers(smollm_ckpt, smollm_hf):
    """Prompt logprobs (and top-5) of the default model against transformers' log-softmax over the
    whole prompt in one pass; the 200-token prompt is computed by the engine in 64-token chunks."""
    engine = Engine(smollm_ckpt, EngineConfig(max_seq_len=256, max_num_seqs=4, max_num_batched_tokens=64,
                                              max_prefill_chunk=64, prefill_buckets=(16, 64), decode_buckets=(4,),
                                              context_buckets=(16,), page_size=16))
    rng = np.random.default_rng(5)
    tok = smollm_ckpt.tokenizer
    prompts = [tok.encode("The capital of France is Paris."), tok.encode_chat([{"role": "user", "content": "Hi!"}]),
               rng.integers(0, smollm_ckpt.config.vocab_size, 200).tolist()]
    outputs = {}
    for prompt in prompts:
        rid = engine.add_request(prompt, SamplingParams(max_tokens=1, prompt_logprobs=5))
        while engine.has_unfinished:
            outputs.update((o.request_id, o) for o in engine.step() if o.request_id == rid)
        scores = outputs[rid].prompt_logprobs
        ref = torch.log_softmax(torch.tensor(ref_logits(smollm_hf, np.array([prompt]))[0]), dim=-1).numpy()
        assert len(scores) == len(prompt) and scores[0] is None
        for p, s in enumerate(scores[1:]):  # position p scores token p + 1
            assert s.token_id == prompt[p + 1]
            assert abs(s.logprob - ref[p, prompt[p + 1]]) <= 1e-4, (len(prompt), p)
            assert [t for t, _ in s.top] == list(np.argsort(-ref[p])[:5]), (len(prompt), p)
            assert max(abs(v - ref[p, t]) for t, v in s.top) <= 1e-4
