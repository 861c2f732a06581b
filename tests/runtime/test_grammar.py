"""Structured outputs (runtime/grammar.py): constraints compiled by llguidance, masks on the device,
matchers advanced by the engine; outputs checked with jsonschema and re, not with llguidance."""

import dataclasses
import json
import time

import jax.numpy as jnp
import numpy as np
import pytest

from meshserve.models.errors import RequestError
from meshserve.runtime.engine import Engine, EngineConfig
from meshserve.runtime.grammar import GrammarCompiler, Guided
from meshserve.runtime.sampling import SamplingParams, allowed
from tests.helpers import PERSON_SCHEMA, guided_cases
from tests.runtime.test_engine import TIGHT


@pytest.fixture(scope="module")
def long_ckpt(tmp_path_factory):
    """The tiny random model with a longer context: a random model writing "any JSON object" ends a
    string only when it happens to draw its quote (1 token in ~250): up to ~1,000 tokens here."""
    from meshserve.models.config import ModelConfig
    from tests.conftest import TINY_CONFIG
    from tests.helpers import random_checkpoint

    config = ModelConfig(**{**TINY_CONFIG, "max_position_embeddings": 2048})
    return random_checkpoint(config, tmp_path_factory.mktemp("tok"), seed=2)


@pytest.fixture(scope="module")
def engine(long_ckpt):
    return Engine(long_ckpt, EngineConfig(max_seq_len=2048, max_num_seqs=64, kv_cache_bytes=2**26,
                                          max_prefill_chunk=64, decode_buckets=(64,)))


def test_bits_unpack_as_llguidance_packs_them():
    rng = np.random.default_rng(0)
    mask = rng.integers(-2**31, 2**31, (3, 4), dtype=np.int64).astype(np.int32)
    expected = np.unpackbits(mask.view(np.uint8), axis=1, bitorder="little")[:, :100].astype(bool)
    assert (np.asarray(allowed(jnp.asarray(mask), 100)) == expected).all()


def test_every_output_of_every_kind_is_valid_at_temperature_1(engine):
    """50 seeds × each kind on a random-weight model (which writes whatever the grammar lets it):
    every output parses and validates, and ends because the grammar was complete or EOS came."""
    for name, guided, check in guided_cases():
        params = [SamplingParams(max_tokens=2000, temperature=1.0, seed=seed, guided=guided) for seed in range(50)]
        for out in engine.generate(["the answer:"] * 50, params):
            assert out.finish_reason == "stop", (name, out.text)
            check(out.text)


def test_rows_without_a_grammar_sample_as_if_alone(engine):
    prompts = ["one two", "three", "four five six"]
    free = [SamplingParams(max_tokens=24, temperature=1.0, seed=s) for s in range(3)]
    alone = [c.token_ids for c in engine.generate(prompts, free)]
    constrained = [SamplingParams(max_tokens=60, temperature=1.0, seed=9, guided=Guided.json_schema(PERSON_SCHEMA)),
                   SamplingParams(max_tokens=60, temperature=0.7, seed=3, guided=Guided("regex", "[0-9]+"))]
    mixed = engine.generate(prompts + ["x", "y"], free + constrained)
    assert [c.token_ids for c in mixed[:3]] == alone


def test_preemption_forks_and_stop_strings_keep_outputs_valid(tiny_ckpt):
    """A pool too small for every request (preemption, recomputation), n > 1 forks of one prompt,
    and a stop string that ends a constrained output early."""
    engine = Engine(tiny_ckpt, TIGHT)
    name, guided, check = guided_cases()[2]  # the regex: short enough for a 60-token context
    params = SamplingParams(max_tokens=24, temperature=1.0, guided=guided)
    preempted = []
    real = engine.scheduler.schedule

    def spy(now):
        plan = real(now)
        preempted.extend(plan.preempted)
        return plan

    engine.scheduler.schedule = spy
    try:
        rids = [engine.add_request([7] * 28, SamplingParams(max_tokens=24, ignore_eos=True))]
        first = engine.add_request("a prompt of some length", dataclasses.replace(params, seed=1))
        rids += [first] + [engine.add_request("a prompt of some length", dataclasses.replace(params, seed=s),
                                              fork_of=first) for s in (2, 3)]
        done = {}
        while engine.has_unfinished:
            for out in engine.step():
                done.setdefault(out.request_id, []).append(out)
    finally:
        del engine.scheduler.schedule
    assert preempted, "the test must preempt"
    for rid in rids[1:]:
        text = "".join(o.text for o in done[rid])
        assert done[rid][-1].finish_reason == "stop"
        check(text)
    stopped = engine.generate(["x"], SamplingParams(max_tokens=40, temperature=1.0, seed=4,
                                                    guided=Guided("regex", "abc-[0-9]{6}"), stop=["-"]))[0]
    assert (stopped.text, stopped.finish_reason) == ("abc", "stop")
    assert engine.kv.num_free == engine.kv.num_usable


def test_padding_columns_past_the_tokenizer_are_never_allowed(engine, long_ckpt):
    grammar = engine.grammars.compile(Guided("regex", ".{1,3}"))  # anything the tokenizer can write
    mask = np.zeros((1, engine.grammars.words), np.int32)
    from meshserve.runtime.grammar import fill_masks

    fill_masks(engine.grammars, [(grammar.matcher(), 0)], mask)
    bits = np.unpackbits(mask.view(np.uint8), bitorder="little")
    tokens = long_ckpt.tokenizer.vocab_size
    assert long_ckpt.config.vocab_size > tokens  # the embedding is wider than the tokenizer
    assert bits[:tokens].sum() > tokens // 2 and not bits[tokens:].any()


@pytest.mark.parametrize("schema,pointer", [
    ({"type": "object", "properties": {"a": {"type": "object", "dependentSchemas": {"b": {}}}}},
     "/properties/a/dependentSchemas"),
    ({"type": "object", "properties": {"x": {"oneOf": [{"type": "string"}, {"type": "string", "maxLength": 3}]}}},
     "/properties/x/oneOf"),  # (a oneOf whose branches cannot overlap is enforced)
])
def test_unsupported_schema_keywords_are_named_by_pointer(engine, schema, pointer):
    with pytest.raises(RequestError, match=f"cannot enforce: {pointer}"):
        engine.check([1, 2], SamplingParams(guided=Guided.json_schema(schema)))


@pytest.mark.parametrize("guided,message", [
    (Guided("json", "{not json"), "the JSON schema is not JSON"),
    (Guided("regex", "[a-"), "the regex does not compile"),
    (Guided("grammar", "start: undefined_rule"), "the grammar does not compile"),
    (Guided("yaml", "a: b"), "the kind must be one of"),
    (Guided("regex", ""), "the regex is empty"),
])
def test_constraints_that_do_not_compile_are_named(engine, guided, message):
    with pytest.raises(RequestError, match=message):
        engine.check([1, 2], SamplingParams(guided=guided))
    with pytest.raises(RequestError, match="min_tokens cannot be combined with a structured-output constraint"):
        engine.check([1, 2], SamplingParams(min_tokens=2, guided=Guided("regex", "a+")))


def deep_schema(depth: int) -> dict:
    schema = {"type": "string"}
    for _ in range(depth):
        schema = {"anyOf": [{"type": "object", "properties": {"a": schema, "b": {"type": "integer"}}},
                            {"type": "array", "items": schema}, schema]}
    return schema


def test_a_schema_past_the_limits_is_refused_at_once_and_remembered(tiny_ckpt):
    compiler = GrammarCompiler(tiny_ckpt.tokenizer, tiny_ckpt.config.vocab_size, timeout_s=2.0)
    t0 = time.perf_counter()
    with pytest.raises(RequestError, match="schema too large"):  # llguidance's size limit
        compiler.compile(Guided.json_schema(deep_schema(8)))
    assert time.perf_counter() - t0 < 2.0
    slow = GrammarCompiler(tiny_ckpt.tokenizer, tiny_ckpt.config.vocab_size, timeout_s=1e-4)
    guided = Guided.json_schema(deep_schema(6))  # compiles, in more than 0.1 ms
    with pytest.raises(RequestError, match="did not compile within 0.0001 s"):
        slow.compile(guided)
    time.sleep(0.5)  # its compile finishes in the background, remembered as refused
    with pytest.raises(RequestError, match="did not compile within"):
        slow.compile(guided)
    fine = compiler.compile(Guided.json_schema(PERSON_SCHEMA))
    assert compiler.compile(Guided("json", json.dumps(PERSON_SCHEMA, separators=(",", ":")))) is fine  # cached
